import os
import sys

# No test may reach a model hub: a hub name would otherwise take ~50 s to fail.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The models in tests are tiny: one thread each, so torch never oversubscribes the cores that the
# sandbox's workers and the em.sh stages run on (a busy-waiting second OpenMP thread slowed tests ~10x).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
