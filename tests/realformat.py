"""Checkpoints in the formats real ones come in, built offline in seconds (no download): tokenizers trained here with
the `tokenizers` library on the embedded task's text, saved with a chat template the way HF checkpoints ship them, and
random Llama / Qwen2 networks built from config (tests/test_real_format.py, tests/test_checkpoints.py).

  qwen_tokenizer()     Qwen2.5-Instruct style: byte-level BPE with Qwen2's pre-tokenizer regex (digits one a token),
                       <|endoftext|> <|im_start|> <|im_end|>, ChatML template, EOS <|im_end|>, PAD <|endoftext|>
  llama_tokenizer()    Llama 2 / TinyLlama style: SentencePiece-like Unigram with the Metaspace pre-tokenizer ("▁",
                       prepend_scheme "first") and byte fallback (no piece holds a newline: it is <0x0A>), <unk> <s>
                       </s>, TinyLlama's (Zephyr) chat template, whose prompt itself holds </s>; BOS added by the
                       post-processor; EOS </s>; no PAD token
  llama3_tokenizer()   Llama 3 style: byte-level BPE with the special tokens at the END of the vocabulary
                       (<|begin_of_text|> <|end_of_text|> <|start_header_id|> <|end_header_id|> <|eot_id|>), no PAD
"""
import json

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import task

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5): letters, single digits, punctuation runs with the
# newlines after them ("```\n" is one pre-token), newline runs.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")

# Qwen2.5-Instruct's template, less the tool-calling branches: a default system message when there is none.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# TinyLlama-1.1B-Chat-v1.0's template (Zephyr's), verbatim: each turn ends with eos_token, so the prompt holds </s>.
TINYLLAMA_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")

# Llama 3.1-Instruct's template, less the date and tool branches.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def corpus(n=300, seed=5):
    """The text a tokenizer is trained on: problems, both teacher solutions, the modes' instructions, chat roles."""
    texts = []
    for record in task.make_problems(n, "train", seed=seed):
        texts += [record["problem"], task.teacher_solution(record, "cot"), task.teacher_solution(record, "code")]
    texts += list(task.INSTRUCTIONS.values()) * 20 + list(task.TINY_TEMPLATES.values()) * 5
    texts += ["system\n", "user\n", "assistant\n", "<|system|>\n", "<|user|>\n", "<|assistant|>\n"] * 20
    return texts


def _byte_level_backend(vocab_size, specials, split=QWEN_SPLIT):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus(), trainer)
    return backend


def qwen_tokenizer(vocab_size=560):
    """ids: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2, then bytes and merges."""
    backend = _byte_level_backend(vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        clean_up_tokenization_spaces=False, chat_template=QWEN_TEMPLATE, padding_side="right")


def llama_tokenizer(vocab_size=700):
    """ids: <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258, then the trained pieces (none with a newline)."""
    specials, byte_pieces = ["<unk>", "<s>", "</s>"], [f"<0x{b:02X}>" for b in range(256)]
    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(corpus(), trainers.UnigramTrainer(
        vocab_size=vocab_size - len(byte_pieces), special_tokens=specials, unk_token="<unk>", show_progress=False,
        max_piece_length=12))
    pieces = [(p, s) for p, s in json.loads(trained.to_str())["model"]["vocab"] if p not in specials and "\n" not in p]
    backend = Tokenizer(models.Unigram([(p, 0.0) for p in specials] + [(b, -100.0) for b in byte_pieces] + pieces,
                                       unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    # what transformers' LlamaConverter writes: "▁" back to spaces, bytes fused, the prefix space stripped
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        clean_up_tokenization_spaces=False, chat_template=TINYLLAMA_TEMPLATE, padding_side="right")


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|eot_id|>"]


def llama3_tokenizer(vocab_size=500):
    """Byte-level BPE of vocab_size ids, then LLAMA3_SPECIALS after it, as in Llama 3 (128000 + i): <|begin_of_text|>
    is vocab_size, <|end_of_text|> vocab_size + 1 (Llama 3's 128001), <|eot_id|> vocab_size + 8 (its 128009)."""
    backend = _byte_level_backend(vocab_size, [])
    backend.add_special_tokens(LLAMA3_SPECIALS)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        clean_up_tokenization_spaces=False, chat_template=LLAMA3_TEMPLATE, padding_side="right")


def hf_config(architecture, tokenizer, vocab_size=None, **overrides):
    """A tiny config of `architecture` ("qwen2" or "llama") whose special ids are the tokenizer's."""
    cls = transformers.Qwen2Config if architecture == "qwen2" else transformers.LlamaConfig
    kwargs = dict(vocab_size=vocab_size or len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=320,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=architecture == "qwen2")
    kwargs.update(overrides)
    return cls(**kwargs)


def random_model(config, seed=0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def teacher_sequences(tokenizer, problems, eos_id):
    """(ids, trainable) of every problem under every mode's chat prompt, answered by the teacher as the warm start
    does (task.tokenize_response, EOS appended): code under the code prompt, CoT under the CoT prompt, and under the
    autonomous prompt code on every other problem. Tool output is not trained on."""
    sequences = []
    for i, record in enumerate(problems):
        for mode in task.MODES:
            style = mode if mode != "auto" else ("code" if i % 2 else "cot")
            prompt = task.encode_prompt(tokenizer, record["problem"], mode)
            response, trainable = task.tokenize_response(tokenizer, task.teacher_solution(record, style), prompt)
            sequences.append((prompt + response + [eos_id], [0] * len(prompt) + trainable + [1]))
    return sequences


def fit(hf, sequences, steps, lr=3e-3, pad_id=0):
    """A few hundred Adam steps of next-token likelihood on the sequences (one batch): enough for a 2-layer model to
    write the teacher's format (code blocks with the tool trigger, \\boxed{}, the EOS) with some of the digits right,
    so that em.sh's iteration sees tool calls, EOS rows, correct and wrong rollouts."""
    length = max(len(ids) for ids, _ in sequences)
    ids = torch.tensor([s + [pad_id] * (length - len(s)) for s, _ in sequences])
    mask = torch.tensor([m + [0] * (length - len(m)) for _, m in sequences], dtype=torch.bool)
    targets = ids[:, 1:][mask[:, 1:]]
    optimizer = torch.optim.Adam(hf.parameters(), lr=lr)
    hf.train()
    for _ in range(steps):
        hidden = hf.model(ids).last_hidden_state[:, :-1][mask[:, 1:]]   # the head on the trained positions only
        logits = hf.lm_head(hidden)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    hf.eval()
    return loss.item()
