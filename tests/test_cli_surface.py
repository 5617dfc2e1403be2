"""The command line's and the Python API's surface, written out: every command, every flag, every public name.

A refactor that moves code must leave these exactly as they are; a deliberate change updates the table here.
"""

import argparse
import inspect

import lmforge
from lmforge.cli import COMMANDS, _load, build_parser_for

# command -> one-line help (as `lmforge --help` shows it)
HELP = {
    'quickstart': 'train a BPE tokenizer and a small GPT on the embedded corpus, then sample',
    'train-tokenizer': 'train a tokenizer on a corpus',
    'prepare': 'tokenize a corpus into memory-mapped token shards',
    'pretrain': 'pre-train a model from a YAML recipe',
    'ngram': 'fit a count-based n-gram LM (Kneser-Ney or backoff) as a baseline',
    'finetune': 'fine-tune a pretrained model on instructions: full, LoRA, DoRA, QLoRA, adapters, prefix/prompt',
    'align': 'align with preferences: DPO, IPO, SimPO, ORPO, reward model, PPO',
    'merge': 'merge fine-tunes of one base (average, task arithmetic, TIES, DARE)',
    'distill': 'distill a teacher into a smaller student of its tokenizer',
    'prune': 'prune a model (magnitude, 2:4, attention heads, MLP channels)',
    'quantize': "quantize a model's linear layers (int8, int4, nf4, q8_0)",
    'generate': 'continue a prompt with a model',
    'chat': 'chat with a model (its chat template), one turn or interactively',
    'embed': 'sentence embeddings from an encoder (MiniLM), to .npy or JSONL',
    'serve': 'serve a model: OpenAI-compatible HTTP API and a chat page',
    'convert': 'convert a model between lmforge, Hugging Face and GGUF',
    'eval': 'evaluate a model (perplexity, bits per byte)',
    'inspect': 'look inside a model: attention, rollout, head ablation, logit lens, attribution, probes',
    'env': 'what to paste into a bug report: the CPU, its kernels, the fast paths chosen',
    'bench': "measure block families' time/memory growth (complexity) or MoE routing overhead (moe)",
}

# command -> [(flag or positional, dest, default, choices, nargs, type name, help)], in the parser's order
ARGUMENTS = {
    'quickstart': [
        ('--steps', 'steps', 600, None, None, 'int',
         'optimizer steps at most (batch 16 x 256 tokens each). (default: 600)'),
        ('--out', 'out', 'runs/quickstart', None, None, 'str',
         'the run folder (tokenizer/, data/, checkpoints/, metrics.jsonl, curves.png, model/). (default: '
         'runs/quickstart)'),
        ('--time-budget', 'time_budget', 180.0, None, None, 'float',
         'seconds of training (after tokenizer training and tokenization, ~10 s). (default: 180.0)'),
        ('--vocab-size', 'vocab_size', 4096, None, None, 'int', 'BPE vocabulary size. (default: 4096)'),
        ('--dtype', 'dtype', 'auto', ('auto', 'bfloat16', 'float32'), None, 'str',
         'auto (bfloat16 where the CPU computes it natively, as measured: lmforge.precision; else float32, '
         'with a note), bfloat16 (autocast; about 2x faster with AVX-512 BF16, many times slower where the CPU'
         ' only emulates it: kept, with a warning) or float32. (default: auto)'),
        ('--threads', 'threads', 0, None, None, 'int',
         "torch threads; 0 keeps torch's default (all cores). (default: 0)"),
        ('--overwrite', 'overwrite', True, None, 0, None,
         'start afresh when <out> already holds a run (its tokenizer and data are reused when they match); '
         '--no-overwrite resumes it instead.'),
        ('--progress', 'progress', True, None, 0, None, 'show the progress bar.'),
        ('--set', 'set_', None, None, '*', 'str',
         'further recipe overrides as dotted key=value items (e.g. model.n_layer=4).'),
    ],
    'train-tokenizer': [
        ('data', 'data', None, None, '+', 'str',
         '"shakespeare" (embedded corpus), text files, .jsonl files with a "text" field, or folders.'),
        ('--out', 'out', 'runs/tokenizer', None, None, 'str',
         'folder to write the tokenizer to (created if needed). (default: runs/tokenizer)'),
        ('--vocab-size', 'vocab_size', 4096, None, None, 'int',
         'largest vocabulary size, special tokens (and for bpe the 256 bytes) included. (default: 4096)'),
        ('--min-frequency', 'min_frequency', 2, None, None, 'int',
         'fewest times a pair must occur to be merged (bpe, wordpiece). (default: 2)'),
        ('--kind', 'kind', 'bpe', None, None, 'str', 'bpe, unigram or wordpiece. (default: bpe)'),
        ('--sentinels', 'sentinels', 100, None, None, 'int',
         'unigram: number of <extra_id_N> tokens for span corruption. (default: 100)'),
    ],
    'prepare': [
        ('--source', 'source', 'shakespeare', None, None, 'str',
         '"shakespeare" (embedded; split by whole works), a .txt/.md/.jsonl file or a folder. (default: '
         'shakespeare)'),
        ('--tokenizer', 'tokenizer', 'char', None, None, 'str',
         'a folder holding tokenizer.json, or "char" for teenyGPT\'s character tokenizer. (default: char)'),
        ('--out', 'out', '', None, None, 'str', 'output folder; default out/data/<source>-<tokenizer>. (default: )'),
        ('--val-fraction', 'val_fraction', 0.0005, None, None, 'float',
         'share of a file/folder source held out for validation (by document). (default: 0.0005)'),
        ('--text-field', 'text_field', 'text', None, None, 'str',
         'JSON key holding the text in .jsonl files. (default: text)'),
        ('--overwrite', 'overwrite', False, None, 0, None,
         'replace an existing prepared folder made from other data or settings.'),
        ('--progress', 'progress', True, None, 0, None, 'show a progress bar on a terminal.'),
    ],
    'pretrain': [
        ('--config', 'config', None, None, None, 'str', 'the recipe YAML, e.g. recipes/gpt2-124m/pretrain.yaml.'),
        ('--set', 'set_', None, None, '*', 'str',
         'overrides as dotted key=value items, e.g. --set train.max_steps=10 model.n_layer=2 optim.lr=1e-3'),
        ('--resume', 'resume', 'none', None, None, 'str',
         '"none" (fresh run; refuses a run folder with checkpoints), "auto" (newest whole checkpoint) or a '
         'checkpoints/step-N folder. (default: none)'),
    ],
    'ngram': [
        ('tokenizer', 'tokenizer', None, None, None, 'str',
         "a model folder or tokenizer.json whose tokenizer to count with (use the transformer's to compare "
         'perplexity per token).'),
        ('--output', 'output', 'runs/ngram', None, None, 'str',
         'the model folder to write (config.json, ngram.safetensors, tokenizer.json). (default: runs/ngram)'),
        ('--data', 'data', 'shakespeare', None, None, 'str',
         '"shakespeare" (its train split) or a .txt/.md/.jsonl file or folder. (default: shakespeare)'),
        ('--order', 'order', 3, None, None, 'int', 'n of the n-grams (3: trigrams). (default: 3)'),
        ('--method', 'method', 'kneser_ney', ('kneser_ney', 'backoff'), None, 'str',
         'kneser_ney (interpolated modified Kneser-Ney) or backoff (absolute-discount backoff). (default: '
         'kneser_ney)'),
        ('--data-dir', 'data_dir', None, None, None, 'str',
         'a folder prepared with this tokenizer (e.g. runs/quickstart/data) to count instead of --data.'),
    ],
    'finetune': [
        ('--config', 'config', None, None, None, 'str',
         "a recipe YAML, e.g. recipes/smollm2-135m/lora.yaml (sections as pretrain's, plus adapter)."),
        ('--method', 'method', None, ('full', 'lora', 'dora', 'qlora', 'adalora', 'adapter', 'prefix', 'prompt'),
         None, 'str',
         'full | lora | dora | qlora | adalora | adapter (Houlsby bottleneck) | prefix | prompt (prefix / '
         'prompt tuning); sets adapter.method.'),
        ('--model', 'model', None, None, None, 'str',
         'what to fine-tune: a model folder, .gguf file or short name (smollm2), with its tokenizer.'),
        ('--data', 'data', None, None, None, 'str',
         'a built-in set (shakespeare-instruct) or a .jsonl file of messages / prompt-response lines.'),
        ('--out', 'out', None, None, None, 'str', 'the run folder (default runs/finetune-<method>).'),
        ('--set', 'set_', None, None, '*', 'str',
         'overrides as dotted key=value items, e.g. --set adapter.r=16 train.max_steps=50 optim.lr=1e-4'),
        ('--resume', 'resume', 'none', None, None, 'str',
         '"none" (fresh run), "auto" (newest whole checkpoint) or a checkpoints/step-N folder. (default: none)'),
    ],
    'align': [
        ('--config', 'config', None, None, None, 'str', 'the recipe YAML, e.g. recipes/smollm2/dpo.yaml.'),
        ('--method', 'method', None, ('dpo', 'ipo', 'simpo', 'orpo', 'reward', 'ppo'), None, 'str',
         'dpo | ipo | simpo | orpo | reward | ppo (overrides align.method).'),
        ('--set', 'set_', None, None, '*', 'str',
         'overrides as dotted key=value items, e.g. --set align.beta=0.2 train.max_steps=10'),
        ('--resume', 'resume', 'none', None, None, 'str',
         '"none" (fresh run), "auto" (newest whole checkpoint) or a checkpoints/step-N folder. (default: none)'),
    ],
    'merge': [
        ('models', 'models', None, None, '+', 'str', 'the fine-tuned model folders (same architecture and base).'),
        ('--out', 'out', 'runs/merged', None, None, 'str',
         'folder to write the merged model to. (default: runs/merged)'),
        ('--base', 'base', None, None, None, 'str',
         'the base model the fine-tunes started from (needed by every method but average).'),
        ('--method', 'method', 'ties', ('average', 'task_arithmetic', 'ties', 'dare', 'dare_ties'), None, 'str',
         'average | task_arithmetic | ties | dare | dare_ties. (default: ties)'),
        ('--weights', 'weights', None, None, '*', 'float',
         'one weight per model (average: mixing weights, default uniform; others: task-vector weights, default'
         ' 1).'),
        ('--density', 'density', 0.5, None, None, 'float',
         'fraction of each task vector kept (ties: largest magnitudes; dare: random, rescaled). (default: 0.5)'),
        ('--scale', 'scale', 1.0, None, None, 'float', 'multiplies the merged task vector (lambda). (default: 1.0)'),
        ('--seed', 'seed', 0, None, None, 'int', "DARE's random drops. (default: 0)"),
        ('--eval-text', 'eval_text', None, None, None, 'str',
         "a text file; prints every model's perplexity on it and the merged model's."),
    ],
    'distill': [
        ('--teacher', 'teacher', 'runs/quickstart/model', None, None, 'str',
         'the teacher model (folder, .gguf or short name). (default: runs/quickstart/model)'),
        ('--out', 'out', 'runs/distill', None, None, 'str', 'run folder. (default: runs/distill)'),
        ('--layers', 'layers', None, None, None, 'int', "the student's depth (default: half the teacher's)."),
        ('--steps', 'steps', 200, None, None, 'int', 'optimizer steps. (default: 200)'),
        ('--batch-size', 'batch_size', 8, None, None, 'int', 'sequences per step. (default: 8)'),
        ('--seq-len', 'seq_len', 128, None, None, 'int', 'tokens per sequence (at most the context). (default: 128)'),
        ('--lr', 'lr', 0.001, None, None, 'float', 'peak learning rate. (default: 0.001)'),
        ('--temperature', 'temperature', 2.0, None, None, 'float',
         'softening of teacher and student distributions. (default: 2.0)'),
        ('--alpha', 'alpha', 0.5, None, None, 'float',
         'weight of the soft KL term (1 - alpha: next-token loss). (default: 0.5)'),
        ('--hidden-weight', 'hidden_weight', 0.0, None, None, 'float',
         'weight of final hidden-state MSE matching (0 = off). (default: 0.0)'),
        ('--source', 'source', 'shakespeare', None, None, 'str',
         'training text: embedded corpus name or a text/JSONL file or folder. (default: shakespeare)'),
        ('--train-tokens', 'train_tokens', 400000, None, None, 'int',
         'tokens of it to train on (the first ones; a tenth as many for validation). (default: 400000)'),
        ('--eval-tokens', 'eval_tokens', 4096, None, None, 'int',
         'tokens of the held-out split scored for perplexity. (default: 4096)'),
        ('--seed', 'seed', 0, None, None, 'int', 'seed of the data order. (default: 0)'),
        ('--report', 'report', True, None, 0, None,
         'measure teacher and student (perplexity, parameters, decode speed).'),
    ],
    'prune': [
        ('--model', 'model', 'runs/quickstart/model', None, None, 'str',
         'a model folder, .gguf file or short name. (default: runs/quickstart/model)'),
        ('--out', 'out', 'runs/pruned', None, None, 'str', 'folder for the pruned model. (default: runs/pruned)'),
        ('--method', 'method', 'magnitude', ('magnitude', '2:4', 'heads', 'mlp'), None, 'str',
         'magnitude (unstructured), 2:4 (semi-structured), heads (drop attention heads), mlp (drop MLP '
         'channels); heads and mlp really shrink the model. (default: magnitude)'),
        ('--sparsity', 'sparsity', 0.5, None, None, 'float',
         'magnitude: fraction of block weights set to 0. (default: 0.5)'),
        ('--keep', 'keep', 0.5, None, None, 'float',
         'heads / mlp: fraction of heads (KV groups) or MLP channels kept in every layer. (default: 0.5)'),
        ('--scope', 'scope', 'layer', ('layer', 'global'), None, 'str',
         'magnitude: rank weights per matrix (layer) or over all blocks (global). (default: layer)'),
        ('--eval-source', 'eval_source', 'shakespeare', None, None, 'str',
         'corpus whose test split measures perplexity (embedded name, or a text file). (default: shakespeare)'),
        ('--eval-tokens', 'eval_tokens', 4096, None, None, 'int', 'tokens of it to score. (default: 4096)'),
        ('--report', 'report', True, None, 0, None, 'measure before and after (perplexity, speed); off: just prune.'),
    ],
    'quantize': [
        ('--model', 'model', '', None, None, 'str',
         'the model to read (folder, .gguf file, short name such as smollm2, or preset:<name>). (default: )'),
        ('--out', 'out', '', None, None, 'str', 'the folder to write (replaced whole if it exists). (default: )'),
        ('--method', 'method', 'int8', ('int8', 'int4', 'nf4', 'q8_0'), None, 'str',
         'int8 (per-channel), int4 (group-wise asymmetric), nf4 (block-wise NormalFloat) or q8_0. (default: '
         'int8)'),
        ('--group-size', 'group_size', 32, None, None, 'int',
         "int4 group size along the input: 32, 64 or 128 (must divide every layer's width). (default: 32)"),
        ('--blocksize', 'blocksize', 64, None, None, 'int', 'NF4 block size. (default: 64)'),
        ('--double-quant', 'double_quant', False, None, 0, None, 'NF4 with int8-quantised block scales.'),
        ('--dtype', 'dtype', None, None, None, 'str',
         'float dtype of what stays in float (norms, biases): float32, bfloat16 or float16.'),
    ],
    'generate': [
        ('prompt', 'prompt', None, None, '+', 'str', 'the text(s) to continue.'),
        ('--model', 'model', 'runs/quickstart/model', None, None, 'str',
         'a model folder, a .gguf file, a short name (smollm2) or preset:<name>. (default: '
         'runs/quickstart/model)'),
        ('--max-new-tokens', 'max_new_tokens', 128, None, None, 'int',
         'how many tokens to add at most. (default: 128)'),
        ('--temperature', 'temperature', 0.8, None, None, 'float', '0 = greedy; higher = more random. (default: 0.8)'),
        ('--top-k', 'top_k', 0, None, None, 'int',
         'sample only among the k most likely tokens (0 = off). (default: 0)'),
        ('--top-p', 'top_p', 1.0, None, None, 'float',
         'nucleus sampling: the smallest set of tokens whose probability reaches p (1 = off). (default: 1.0)'),
        ('--repetition-penalty', 'repetition_penalty', 1.0, None, None, 'float',
         '> 1 discourages repeating tokens already present. (default: 1.0)'),
        ('--stop', 'stop', None, None, '*', 'str', 'stop when one of these strings appears (not printed).'),
        ('--seed', 'seed', None, None, None, 'int', 'random seed, for reproducible sampling.'),
        ('--dtype', 'dtype', 'float32', None, None, 'str', 'float32 or bfloat16. (default: float32)'),
        ('--truncate', 'truncate', False, None, 0, None,
         'keep the last tokens of a prompt longer than the context instead of failing.'),
        ('--stream', 'stream', True, None, 0, None,
         'print text as it is generated (one prompt only; not with beam search).'),
        ('--num-beams', 'num_beams', 1, None, None, 'int',
         'beam search with this many beams (1 = off; deterministic, ignores sampling settings). (default: 1)'),
        ('--length-penalty', 'length_penalty', 1.0, None, None, 'float',
         'beam search: a finished beam scores sum(log p) / length ** length_penalty. (default: 1.0)'),
        ('--early-stopping', 'early_stopping', 'false', ('false', 'true', 'never'), None, 'str',
         'beam search: true = stop once num_beams beams finished; false = once no running beam can beat them '
         'at its current length; never = ... at the longest length. (default: false)'),
        ('--num-return-sequences', 'num_return_sequences', 1, None, None, 'int',
         'beam search: print this many best beams per prompt. (default: 1)'),
        ('--draft', 'draft', None, None, None, 'str',
         'speculative decoding with this smaller model of the same tokenizer as the draft.'),
        ('--prompt-lookup', 'prompt_lookup', 0, None, None, 'int',
         'speculative decoding that drafts by copying from the context, matching n-grams up to this long (0 = '
         'off; 3 is a good choice). (default: 0)'),
        ('--draft-tokens', 'draft_tokens', 5, None, None, 'int',
         'speculative decoding: tokens drafted per step. (default: 5)'),
        ('--compile', 'compile', False, None, 0, None,
         'torch.compile the decode step (compiles once, then faster per token; close to, not bit-identical '
         'with, the default eager decoding).'),
    ],
    'chat': [
        ('--model', 'model', 'smollm2', None, None, 'str',
         'a model folder, a .gguf file or a short name (smollm2). (default: smollm2)'),
        ('--message', 'message', None, None, '*', 'str',
         'message(s) to send non-interactively, in order, as one conversation.'),
        ('--system', 'system', None, None, None, 'str', 'an optional system prompt.'),
        ('--max-new-tokens', 'max_new_tokens', 256, None, None, 'int', 'longest reply, in tokens. (default: 256)'),
        ('--temperature', 'temperature', 0.0, None, None, 'float', '0 = greedy; higher = more random. (default: 0.0)'),
        ('--top-p', 'top_p', 1.0, None, None, 'float', 'nucleus sampling threshold (1 = off). (default: 1.0)'),
        ('--seed', 'seed', None, None, None, 'int', 'random seed for sampling.'),
        ('--dtype', 'dtype', 'float32', None, None, 'str', 'float32 or bfloat16. (default: float32)'),
    ],
    'embed': [
        ('--texts', 'texts', None, None, '*', 'str', 'sentences to embed (--texts "first" "second"), or use --file.'),
        ('--model', 'model', 'minilm', None, None, 'str',
         'model folder or short name (default: minilm, all-MiniLM-L6-v2). (default: minilm)'),
        ('--file', 'file', None, None, None, 'str',
         'a text file with one sentence per line, or a .jsonl file with a "text" field per line.'),
        ('--out', 'out', 'embeddings.npy', None, None, 'str',
         'output path: .npy (an N x d float32 array) or .jsonl ({"text", "embedding"} per line). (default: '
         'embeddings.npy)'),
        ('--batch-size', 'batch_size', 32, None, None, 'int', 'sentences per forward pass. (default: 32)'),
        ('--pooling', 'pooling', 'mean', ('mean', 'cls'), None, 'str',
         'mean over tokens, or the first ([CLS]) token. (default: mean)'),
        ('--normalize', 'normalize', True, None, 0, None, 'scale each embedding to unit length.'),
        ('--truncate', 'truncate', False, None, 0, None,
         "cut inputs longer than the model's context instead of stopping with an error."),
        ('--dtype', 'dtype', 'float32', ('float32', 'bfloat16'), None, 'str',
         "the weights' precision. bfloat16 is about 2x faster on CPUs with AMX (all-MiniLM-L6-v2 at batch 1, "
         'Xeon, bench/encode.py) and stays within ~3e-3 of float32 (cosine >= 0.9999); output is float32. '
         '(default: float32)'),
    ],
    'serve': [
        ('--model', 'model', 'smollm2', None, None, 'str',
         'a model folder, a .gguf file, a short name (smollm2) or preset:<name>. (default: smollm2)'),
        ('--host', 'host', '127.0.0.1', None, None, 'str',
         'address to bind; 127.0.0.1 keeps the server local (0.0.0.0 exposes it). (default: 127.0.0.1)'),
        ('--port', 'port', 8000, None, None, 'int', 'TCP port. (default: 8000)'),
        ('--api-key', 'api_key', None, None, None, 'str',
         "require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $LMFORGE_API_KEY)."),
        ('--model-name', 'model_name', None, None, None, 'str',
         "the model id clients send (default: the model's config name)."),
        ('--dtype', 'dtype', None, None, None, 'str', 'float32 or bfloat16 (default: as stored).'),
        ('--tokenizer', 'tokenizer', None, None, None, 'str',
         "a folder or tokenizer.json to use instead of the model's own."),
        ('--max-seqs', 'max_seqs', 16, None, None, 'int', 'most sequences decoding together. (default: 16)'),
        ('--max-queue', 'max_queue', 64, None, None, 'int',
         'most requests waiting; beyond it requests get 429. (default: 64)'),
        ('--max-kv-mb', 'max_kv_mb', 1024, None, None, 'int', 'cap on KV cache memory in MiB. (default: 1024)'),
        ('--max-body-kb', 'max_body_kb', 1024, None, None, 'int',
         'largest request body in KiB (413 beyond). (default: 1024)'),
        ('--max-prompt-tokens', 'max_prompt_tokens', None, None, None, 'int',
         "longest prompt accepted (default: the model's context)."),
        ('--max-tokens', 'max_tokens', None, None, None, 'int',
         "largest max_tokens a request may ask for (default: the model's context)."),
        ('--graceful-timeout', 'graceful_timeout', 10.0, None, None, 'float',
         'seconds open requests get to finish on SIGTERM before they are cancelled. (default: 10.0)'),
        ('--log-level', 'log_level', 'info', None, None, 'str', "uvicorn's log level. (default: info)"),
        ('--dequantize', 'dequantize', False, None, 0, None,
         "expand a GGUF file's Q8_0/Q4_0/Q4_1 layers to float (--dtype) instead of running them quantized: on "
         'a CPU with AMX, bfloat16 reads prompts ~3x faster than Q4_1 (README, Serving).'),
        ('--prefill-tokens', 'prefill_tokens', 512, None, None, 'int',
         'most prompt tokens read per engine step beside the decoding streams (longer prompts are read in '
         'chunks); larger reads prompts faster, smaller pauses running streams less. (default: 512)'),
    ],
    'convert': [
        ('src', 'src', None, None, None, 'str', 'the model to read.'),
        ('dst', 'dst', None, None, None, 'str',
         'the folder (hf) or .gguf file (gguf) to write; replaced whole if it exists.'),
        ('--to', 'to', None, ('hf', 'gguf'), None, 'str',
         'target format; default: gguf if DST ends in .gguf, else hf.'),
        ('--dtype', 'dtype', None, None, None, 'str',
         'hf: float32, bfloat16 or float16 (default: as loaded); gguf: f32, f16, bf16 or q8_0 (default f16).'),
        ('--allow-pickle', 'allow_pickle', False, None, 0, None,
         'read .bin/.pt weights in SRC (with weights_only=True).'),
    ],
    'eval': [
        ('task', 'task', None, ('perplexity',), None, 'str', 'what to measure.'),
        ('--model', 'model', None, None, None, 'str',
         'a model folder, a .gguf file, a short name (smollm2) or preset:<name>.'),
        ('--data', 'data', None, None, None, 'str',
         'a .txt/.md/.jsonl file or a folder of them, "shakespeare" (the held-out works of --split) or '
         '"shakespeare:<work>" (e.g. shakespeare:macbeth).'),
        ('--split', 'split', 'test', None, None, 'str',
         'split of an embedded corpus: train, val, test or all. (default: test)'),
        ('--max-length', 'max_length', None, None, None, 'int',
         "context window in tokens (default: the model's context)."),
        ('--stride', 'stride', None, None, None, 'int',
         'tokens scored per forward pass (default: half the window, so each sees >= half a window).'),
        ('--max-tokens', 'max_tokens', None, None, None, 'int',
         'score only the first N tokens (to bound the time on a CPU).'),
        ('--dtype', 'dtype', 'float32', None, None, 'str', 'float32 or bfloat16. (default: float32)'),
        ('--text-field', 'text_field', 'text', None, None, 'str',
         'the JSON key holding the text in .jsonl files. (default: text)'),
        ('--output', 'output', None, None, None, 'str', 'also write the result as JSON to this file.'),
    ],
    'inspect': [
        ('analysis', 'analysis', None, None, None, 'str',
         'attention (maps per layer and head), rollout (attention rollout and flow), heads (head ablation), '
         'lens (logit lens), attribute (integrated gradients, gradient x input or saliency) or probe (linear '
         'probes per layer).'),
        ('--model', 'model', 'smollm2', None, None, 'str',
         'a model folder, a .gguf file, a short name (smollm2) or preset:<name>. (default: smollm2)'),
        ('--text', 'text', None, None, None, 'str', 'the input text (every analysis but probe).'),
        ('--out', 'out', 'runs/inspect', None, None, 'str',
         'folder to write the files to (created if needed). (default: runs/inspect)'),
        ('--layer', 'layer', None, None, None, 'int', 'attention: show only this layer.'),
        ('--head', 'head', None, None, None, 'int', 'attention: show only this head (of every layer shown).'),
        ('--target', 'target', None, None, None, 'str',
         "the token to explain (lens: its rank at every layer; attribute, heads with logit_diff): a token's "
         'text such as " Paris", or a token id; default the model\'s own next token.'),
        ('--k', 'k', 5, None, None, 'int', 'lens: top tokens kept per layer and position. (default: 5)'),
        ('--attribution', 'attribution', 'integrated_gradients', None, None, 'str',
         'attribute: integrated_gradients, gradient_x_input or saliency. (default: integrated_gradients)'),
        ('--steps', 'steps', 50, None, None, 'int', 'attribute: integrated-gradients steps. (default: 50)'),
        ('--method', 'method', 'gausslegendre', None, None, 'str',
         'attribute: the integration rule: gausslegendre, riemann_trapezoid, riemann_left, riemann_right or '
         'riemann_middle. (default: gausslegendre)'),
        ('--baseline', 'baseline', 'pad', None, None, 'str',
         'attribute: the integrated-gradients baseline: pad (that token everywhere), zeros, mask or unk. '
         '(default: pad)'),
        ('--metric', 'metric', 'loss', None, None, 'str',
         'heads: loss or logit_diff (then --target and --distractor name the two tokens). (default: loss)'),
        ('--distractor', 'distractor', None, None, None, 'str', 'heads: the competing token of logit_diff.'),
        ('--data', 'data', None, None, None, 'str',
         'heads: a text file of sentences, one per line, ablated together (with --text if given).'),
        ('--task', 'task', 'comedy_vs_tragedy', None, None, 'str',
         'probe: the labelled probing task (comedy_vs_tragedy, verse_vs_prose, ...). (default: '
         'comedy_vs_tragedy)'),
        ('--pooling', 'pooling', 'mean', None, None, 'str',
         "probe: mean or last (how a text's token representations become one vector). (default: mean)"),
        ('--limit', 'limit', None, None, None, 'int', 'probe: use at most this many examples.'),
        ('--seed', 'seed', 0, None, None, 'int', 'probe: the seed of the split and the control labels. (default: 0)'),
        ('--dtype', 'dtype', 'float32', None, None, 'str', 'float32 or bfloat16. (default: float32)'),
    ],
    'env': [
        ('--json', 'json', False, None, 0, None, 'print the same as one JSON object.'),
    ],
    'bench': [
        ('what', 'what', None, ('complexity', 'moe', 'decode'), None, 'str',
         '"complexity" (training/decode time and memory vs length, fitted exponents, PNG, and the Mamba vs '
         'dense decode comparison), "moe" (training tokens/s of an MoE vs the dense model with its active '
         'parameters) or "decode" (only Mamba\'s decode step vs the dense transformer of about its parameter '
         'count, at positions 512 and 4,096, best of 7 alternating rounds).'),
        ('--out', 'out', 'bench/results', None, None, 'str',
         'folder for complexity.json / complexity.png / complexity.md. (default: bench/results)'),
        ('--quick', 'quick', False, None, 0, None, 'fewer lengths (256..2048 training; decode at 512, 2048, 8192).'),
        ('--d-model', 'd_model', 256, None, None, 'int', 'model width of every family. (default: 256)'),
        ('--n-layer', 'n_layer', 4, None, None, 'int',
         'transformer layers (Mamba gets 2.5x as many, to match parameters). (default: 4)'),
    ],
}

LLM_PUBLIC = ["chat", "config", "embed", "encode_prompt", "eos_ids", "generate", "inspect", "quantize", "save",
              "tokenizer"]


def _arguments(command: str) -> list[tuple]:
    target, _ = COMMANDS[command]
    parser = argparse.ArgumentParser()
    build_parser_for(_load(target), parser)
    rows = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        name = a.option_strings[0] if a.option_strings else a.dest
        type_name = getattr(a.type, "__name__", None) if a.type else None
        choices = tuple(a.choices) if a.choices else None
        rows.append((name, a.dest, a.default, choices, a.nargs, type_name, a.help))
    return rows


def test_the_commands_and_their_help_are_exactly_these():
    assert {name: short for name, (_, short) in COMMANDS.items()} == HELP
    assert list(COMMANDS) == list(HELP)  # `lmforge --help` lists them in this order


def test_every_command_has_exactly_these_flags_and_positionals():
    for command, expected in ARGUMENTS.items():
        assert _arguments(command) == expected, command


def test_bool_flags_come_in_pairs():
    target, _ = COMMANDS["quickstart"]
    parser = argparse.ArgumentParser()
    build_parser_for(_load(target), parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {"--overwrite", "--no-overwrite", "--progress", "--no-progress"} <= flags


def test_the_public_python_api():
    assert lmforge.__all__ == ["Config", "LLM", "get_preset", "list_presets", "load", "serve", "__version__"]
    assert lmforge.__version__ == "0.1.0"
    for name in ("load", "get_preset", "list_presets", "serve"):
        assert callable(getattr(lmforge, name)), name
    assert inspect.isclass(lmforge.LLM) and inspect.isclass(lmforge.Config)
    assert list(inspect.signature(lmforge.load).parameters)[0] == "source"
    assert sorted(n for n in dir(lmforge.LLM) if not n.startswith("_")) == LLM_PUBLIC
    assert "preset:teenygpt".split(":")[1] in lmforge.list_presets()
    assert lmforge.get_preset("teenygpt") is not None
