#!/usr/bin/env bash
# em.sh: the whole EM loop of tocode as chained stages (README: How it works).
#
#   warm start ─▶ evaluate (iteration 0)
#   for i in 1..ITERS:  explore ─▶ synthesize ─▶ train (M-step) ─▶ evaluate      under runs/$NAME/iter_$i/
#   runs/$NAME/summary.json + a table, one row per evaluated checkpoint
#
# Every stage writes its output under a temporary name and renames it when complete, so a complete
# output means a finished stage: rerunning after a kill skips what is done, and the interrupted stage
# resumes its own partial file (explore, evaluate) or starts over (train, a few minutes at most).
#
#   bash em.sh                                 # the embedded default on a CPU, ~8 minutes on 2 cores
#   SEED=2 bash em.sh                          # the same with every seed moved (run name demo-seed2)
#   STRATEGY=rl bash em.sh                     # the paper's RL-only ablation (run name demo-rl)
#   NAME=qwen MODEL=path/to/Qwen2.5-Math-1.5B-Instruct QUERIES=train.jsonl TEST=test.jsonl \
#     N_QUERIES=7000 K=8 MAX_NEW_TOKENS=1024 bash em.sh       # a real checkpoint on a GPU
set -euo pipefail
cd "$(dirname "$0")"

# ----------------------------------------------------------------------------- knobs
STRATEGY=${STRATEGY:-em}        # em: the paper | rl: RL-only ablation (all rollouts autonomous) | sft: SFT-only ablation
SEED=${SEED:-1}                 # moves every seed: warm-start init and data, queries, exploration, synthesis, M-step
NAME=${NAME:-demo$([ "$STRATEGY" = em ] || echo "-$STRATEGY")$([ "$SEED" = 1 ] || echo "-seed$SEED")}  # output: $RUNS/$NAME/
RUNS=${RUNS:-runs}              # parent dir of the runs
MODEL=${MODEL:-}                # starting checkpoint (HF dir); empty = warm start of the tiny preset (python train.py)
QUERIES=${QUERIES:-}            # training queries JSONL; empty = the embedded task's train split (python task.py)
TEST=${TEST:-}                  # test queries JSONL; empty = the embedded task's test split
ITERS=${ITERS:-2}               # EM iterations (paper: 2-3)
N_QUERIES=${N_QUERIES:-300}     # queries per iteration: a fresh slice of QUERIES each iteration (paper: ~7K)
N_TEST=${N_TEST:-400}           # test problems when TEST is generated
K=${K:-4}                       # rollouts per query per mode (paper: 5 or 8); STRATEGY=rl draws 3K autonomous ones
FORM=${FORM:-argmax}            # reference strategy s*: posterior | tempered (the paper) | argmax (paper v1).
                                # argmax here: the softer forms follow the model's own π where both methods
                                # succeed, which lets code creep into easy families (docs/TASK.md)
EPOCHS=${EPOCHS:-2}             # M-step passes over the synthesized records
LR=${LR:-$([ -z "$MODEL" ] && [[ "${WARMSTART_ARGS:-}" != *--init=* ]] && echo 1e-4 || echo 1e-6)}   # M-step peak
                                # learning rate: 1e-4 for the 0.46M tiny preset, 1e-6 for a pretrained checkpoint
                                # (MODEL, or a warm start from WARMSTART_ARGS=--init=DIR), as RL recipes for 1.5-7B use
SFT_WEIGHT=${SFT_WEIGHT:-$([ "$STRATEGY" = rl ] && echo 0 || echo 1.0)}  # λ; RL-only has no D_s*, so no λ term.
                                # The λ term keeps easy-family CoT sharp while RL moves the method choice
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-192}   # per response, tool output included (explore and evaluate)
TEMPERATURE=${TEMPERATURE:-0.5} # exploration temperature; the M-step evaluates π_θ at the same one (the ratio's π_b).
                                # Q(x,c) should estimate what the deployed (greedy) policy gets, and sampling noise
                                # makes CoT look worse than it is, so at a higher T code wins ties it should lose
WARMSTART_ARGS=${WARMSTART_ARGS:-}      # extra flags for each stage, e.g. EXPLORE_ARGS="--tool_timeout=10"
EXPLORE_ARGS=${EXPLORE_ARGS:-}
SYNTHESIZE_ARGS=${SYNTHESIZE_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
EVALUATE_ARGS=${EVALUATE_ARGS:-}
SHARDS=${SHARDS:-1}             # GPUs: explore and evaluate run as SHARDS processes side by side, one GPU each (the
                                # same records as one process), and the M-step under torchrun on all of them
CPU_PROCS=${CPU_PROCS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}   # without a GPU: explore and evaluate run as this many
                                # processes side by side, one core each (the same records as one process), and the
                                # M-step as one process on every core. A decode step of the tiny model is mostly
                                # per-op overhead, which a second thread does not share
WARM_CODE_MIN=${WARM_CODE_MIN:-0.8}   # the warm start's forced accuracy the demo needs, per family, with code on mul
WARM_COT_MIN=${WARM_COT_MIN:-0.9}     # and chain and with CoT on the others: a tiny warm start whose check misses
                                      # them is repaired (train.py --repairs), and below either on the test split
                                      # after the warm start, em.sh says so
PYTHON=${PYTHON:-python}
# -----------------------------------------------------------------------------

case $STRATEGY in em|rl|sft) ;; *) echo "em.sh: STRATEGY must be em, rl or sft, not '$STRATEGY'" >&2; exit 2;; esac
RUN=$RUNS/$NAME
mkdir -p "$RUN"
START=$SECONDS
KNOBS="STRATEGY=$STRATEGY SEED=$SEED NAME=$NAME MODEL=${MODEL:-<warm start>} QUERIES=${QUERIES:-<generated>}"
KNOBS+=" TEST=${TEST:-<generated>} ITERS=$ITERS N_QUERIES=$N_QUERIES N_TEST=$N_TEST K=$K FORM=$FORM EPOCHS=$EPOCHS"
KNOBS+=" LR=$LR SFT_WEIGHT=$SFT_WEIGHT MAX_NEW_TOKENS=$MAX_NEW_TOKENS TEMPERATURE=$TEMPERATURE"
KNOBS+=" WARMSTART_ARGS='$WARMSTART_ARGS' EXPLORE_ARGS='$EXPLORE_ARGS' SYNTHESIZE_ARGS='$SYNTHESIZE_ARGS'"
KNOBS+=" TRAIN_ARGS='$TRAIN_ARGS' EVALUATE_ARGS='$EVALUATE_ARGS'"
KNOBS+=$([ "$SHARDS" = 1 ] || echo " SHARDS=$SHARDS")   # more GPUs change the M-step's global batch
echo "em.sh: $KNOBS"
# A run dir is resumed only with the knobs that started it: otherwise finished stages of one setting would be mixed
# with new stages of another.
if [ -e "$RUN/knobs.txt" ] && [ "$(cat "$RUN/knobs.txt")" != "$KNOBS" ]; then
    echo "em.sh: $RUN was started with other knobs ($(cat "$RUN/knobs.txt")); use another NAME or delete $RUN" >&2
    exit 2
fi
echo "$KNOBS" > "$RUN/knobs.txt"

# stage LABEL OUTPUT COMMAND...: run COMMAND unless OUTPUT exists (the stage then finished before).
stage() {
    local label=$1 output=$2; shift 2
    if [ -e "$output" ]; then
        echo "== $label: done ($output)"
        return
    fi
    echo "== $label: $*"
    local t0=$SECONDS
    "$@"
    echo "== $label: $((SECONDS - t0)) s" | tee -a "$RUN/times.txt"
}

# sharded COMMAND...: COMMAND (explore.py or evaluate.py) as PROCS processes side by side, shard s on the s-th GPU
# (of CUDA_VISIBLE_DEVICES if set) or on THREADS CPU threads, its log in OUT.shard<s>of<PROCS>.log (shard 0's also
# on the console), then the merge of their parts into COMMAND's --out. The stage fails if a shard fails; a rerun
# resumes each shard's own partial file.
sharded() {
    local arg out s gpus pids=() failed=0
    for arg in "$@"; do case $arg in --out=*) out=${arg#--out=};; esac; done
    IFS=, read -ra gpus <<< "${CUDA_VISIBLE_DEVICES:-}"
    # background jobs do not get Ctrl-C: the shards are stopped here, not left running
    trap 'kill "${pids[@]}" 2>/dev/null; exit 1' INT TERM
    for ((s = 1; s < PROCS; s++)); do
        CUDA_VISIBLE_DEVICES=${gpus[s]:-$s} OMP_NUM_THREADS=$THREADS "$@" --shard="$s/$PROCS" \
            > "$out.shard${s}of$PROCS.log" 2>&1 &
        pids+=($!)
    done
    CUDA_VISIBLE_DEVICES=${gpus[0]:-0} OMP_NUM_THREADS=$THREADS "$@" --shard="0/$PROCS" 2>&1 \
        | tee "$out.shard0of$PROCS.log" || { echo "em.sh: shard 0/$PROCS failed" >&2; failed=1; }
    for s in "${!pids[@]}"; do
        wait "${pids[s]}" || { echo "em.sh: shard $((s + 1))/$PROCS failed, see $out.shard$((s + 1))of$PROCS.log" >&2
                               failed=1; }
    done
    trap - INT TERM
    [ "$failed" = 0 ] || return 1
    "$@" --merge="$PROCS"
}
case $SHARDS in [1-9]|[1-9][0-9]) ;; *) echo "em.sh: SHARDS must be a number of GPUs, not '$SHARDS'" >&2; exit 2;; esac
case $CPU_PROCS in [1-9]|[1-9][0-9]) ;; *) echo "em.sh: CPU_PROCS must be a number, not '$CPU_PROCS'" >&2; exit 2;; esac
PROCS=$([ "$($PYTHON -c 'import torch; print(torch.cuda.is_available())')" = True ] && echo "$SHARDS" || echo "$CPU_PROCS")
THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / PROCS > 0 ? $(nproc) / PROCS : 1 ))}   # per shard
SHARDED=$([ "$PROCS" = 1 ] || echo sharded)       # empty for one process: the stages run as plain commands
TRAIN_LAUNCH=$PYTHON$([ "$SHARDS" = 1 ] || echo " -m torch.distributed.run --standalone --nproc_per_node=$SHARDS")

# The data. The test split is the same for every SEED (so seeds compare on the same problems); the training queries
# are drawn with another seed than the warm start's problems.
if [ -z "$QUERIES" ]; then
    QUERIES=$RUN/queries.jsonl
    stage "queries" "$QUERIES" $PYTHON task.py --split=train --seed=$((1000 + SEED)) --n=$((ITERS * N_QUERIES)) --out="$QUERIES"
fi
if [ -z "$TEST" ]; then
    TEST=$RUN/test.jsonl
    stage "test queries" "$TEST" $PYTHON task.py --split=test --seed=0 --n="$N_TEST" --out="$TEST"
fi

# Iteration 0: the starting checkpoint.
mkdir -p "$RUN/iter_0"
WARM_START=$([ -z "$MODEL" ] && echo 1 || echo 0)
if [ -z "$MODEL" ]; then
    MODEL=$RUN/iter_0/model
    stage "warm start" "$MODEL/config.json" $PYTHON train.py --out="$MODEL" --seed="$SEED" \
        --code_min="$WARM_CODE_MIN" --cot_min="$WARM_COT_MIN" $WARMSTART_ARGS
fi
stage "evaluate 0" "$RUN/iter_0/eval/summary.json" \
    $SHARDED $PYTHON evaluate.py --model="$MODEL" --data="$TEST" --mode=all --out="$RUN/iter_0/eval" \
    --max_new_tokens="$MAX_NEW_TOKENS" $EVALUATE_ARGS

# take_queries I OUT: the I-th slice of N_QUERIES lines of QUERIES (wrapping around a short file).
take_queries() {
    local lines
    lines=$(grep -c . "$QUERIES")
    awk -v start=$((($1 - 1) * N_QUERIES)) -v n="$N_QUERIES" -v total="$lines" '
        NF { i = (NR - 1 - start) % total; if (i < 0) i += total; if (i < n) print }' "$QUERIES" > "$2.partial"
    mv "$2.partial" "$2"
}

if [ "$STRATEGY" = rl ]; then
    EXPLORE_MODES=(--modes=auto --k=$((3 * K)))   # the same number of rollouts per query, all autonomous
else
    EXPLORE_MODES=(--modes=code,cot,auto --k="$K")
fi
TRAIN_MODE=$([ "$STRATEGY" = sft ] && echo sft || echo rl)

for ((i = 1; i <= ITERS; i++)); do
    DIR=$RUN/iter_$i
    mkdir -p "$DIR"
    stage "queries $i" "$DIR/queries.jsonl" take_queries "$i" "$DIR/queries.jsonl"
    # E-step: explore with the current model, then the reference strategy and the training records.
    stage "explore $i" "$DIR/rollouts.jsonl" \
        $SHARDED $PYTHON explore.py --model="$MODEL" --queries="$DIR/queries.jsonl" --out="$DIR/rollouts.jsonl" \
        "${EXPLORE_MODES[@]}" --temperature="$TEMPERATURE" --max_new_tokens="$MAX_NEW_TOKENS" --seed=$((1000 * SEED + i)) $EXPLORE_ARGS
    stage "synthesize $i" "$DIR/train.jsonl" \
        $PYTHON synthesize.py --rollouts="$DIR/rollouts.jsonl" --out="$DIR/train.jsonl" --strategy="$STRATEGY" \
        --form="$FORM" --seed=$((1000 * SEED + i)) $SYNTHESIZE_ARGS
    # M-step: from the current model, on the records.
    stage "train $i" "$DIR/model/config.json" \
        $TRAIN_LAUNCH train.py --mode="$TRAIN_MODE" --init="$MODEL" --data="$DIR/train.jsonl" --out="$DIR/model" \
        --epochs="$EPOCHS" --finetune_lr="$LR" --sft_weight="$SFT_WEIGHT" --temperature="$TEMPERATURE" --seed=$((1000 * SEED + i)) $TRAIN_ARGS
    MODEL=$DIR/model
    stage "evaluate $i" "$DIR/eval/summary.json" \
        $SHARDED $PYTHON evaluate.py --model="$MODEL" --data="$TEST" --mode=all --out="$DIR/eval" \
        --max_new_tokens="$MAX_NEW_TOKENS" $EVALUATE_ARGS
done

# runs/$NAME/summary.json: one object per evaluated checkpoint, and the table.
$PYTHON - "$RUN" "$ITERS" "$WARM_START" "$WARM_CODE_MIN" "$WARM_COT_MIN" <<'EOF'
import json, os, sys
from jsonl import write_json_atomic
from task import EASY_FAMILIES, FAMILIES, HARD_FAMILIES

run, iters, warm_start = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
minimum = {"code": float(sys.argv[4]), "cot": float(sys.argv[5])}
rows = []
for i in range(iters + 1):
    path = os.path.join(run, f"iter_{i}", "eval", "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            rows.append({"iteration": i, **json.load(f)})

def pct(x, width=5):
    return "-".rjust(width) if x is None else f"{100 * x:{width}.1f}"

# EM can only learn to choose between methods the warm start can carry out: forced code right where CoT is hopeless,
# forced CoT right where it is reliable. A warm start that misses is named in summary.json and below.
if warm_start and rows and rows[0]["iteration"] == 0:
    wanted = [("code", f) for f in HARD_FAMILIES] + [("cot", f) for f in EASY_FAMILIES]
    accuracy = {(m, f): rows[0].get(m, {}).get("by_family", {}).get(f, {}).get("accuracy") for m, f in wanted}
    rows[0]["warm_start_misses"] = [f"forced {m} on {f}: {pct(a).strip()}%" for (m, f), a in accuracy.items()
                                    if a is not None and a < minimum[m]]
    config = os.path.join(run, "iter_0", "model", "train_config.json")
    if os.path.exists(config):
        with open(config) as f:
            config = json.load(f)
        rows[0]["warm_start_steps"] = config.get("steps_run")
        rows[0]["warm_start_restarts"] = config.get("restarts_run")
        rows[0]["warm_start_repairs"] = config.get("repairs_run")
write_json_atomic(os.path.join(run, "summary.json"), rows)

# The embedded task's families in their order (CoT reliable first, CoT hopeless last), then any others.
seen = {f for r in rows for f in r.get("auto", {}).get("by_family", {})}
families = [f for f in FAMILIES if f in seen] + sorted(seen - set(FAMILIES))
print(f"\n{run}: accuracy % per mode, selection %, calls per problem, and the autonomous code rate % per family"
      f" (test split, greedy)")
print("iter   auto   code    cot select | calls auto  code | " + " ".join(f"{f:>10}" for f in families))
for r in rows:
    auto, code, by_family = r.get("auto", {}), r.get("code", {}), r.get("auto", {}).get("by_family", {})
    print(f"{r['iteration']:>4}  {pct(auto.get('accuracy'))}  {pct(code.get('accuracy'))}  "
          f"{pct(r.get('cot', {}).get('accuracy'))}  {pct(auto.get('selection_accuracy'))} |"
          f"       {auto.get('calls_per_problem', 0):4.2f}  {code.get('calls_per_problem', 0):4.2f} | "
          + " ".join(pct(by_family.get(f, {}).get("code_rate"), 10) for f in families))
misses = rows[0].get("warm_start_misses") if rows else None
if misses:
    print(f"\nem.sh: THE WARM START MISSED ITS THRESHOLDS (forced code below {pct(minimum['code']).strip()}% or "
          f"forced CoT below {pct(minimum['cot']).strip()}%): "
          f"{'; '.join(misses)}.\nEM cannot be expected to meet the demo's bars from it: try another SEED, or more "
          f"repairs of the warm start (WARMSTART_ARGS=\"--repairs=N\")")
elif misses is not None:
    print(f"warm start ({rows[0].get('warm_start_steps')} steps, {rows[0].get('warm_start_restarts')} restarts, "
          f"{rows[0].get('warm_start_repairs')} repairs): "
          f"forced code on {', '.join(HARD_FAMILIES)} at least {pct(minimum['code']).strip()}%, forced CoT on "
          f"{', '.join(EASY_FAMILIES)} at least {pct(minimum['cot']).strip()}%")
print(f"wrote {os.path.join(run, 'summary.json')}")
EOF
# runs/$NAME/report.html and report.md: the same numbers as plots and tables, with s* per family and the stage times.
$PYTHON report.py "$RUN" || echo "em.sh: report.py failed; the run itself is complete" >&2
echo "em.sh: finished in $((SECONDS - START)) s (this invocation)"
