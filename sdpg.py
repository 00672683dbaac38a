"""SDPG: Self-Distilled Policy Gradient (Liu, Zhang, Zhang, Gu, arXiv 2606.04036), in one file.

RL with verifiable rewards where the model, shown a privileged context c (the reference
solution), is a dense full-vocabulary teacher for its own rollouts:

    L = L_out + beta(k) * L_OPD^+ + alpha * L_K(pi_theta, pi_ref)                    (Eq. 3.1)

One GPU (Qwen2.5-0.5B on GSM8K), plain GRPO on the same code path, a local model and data on the CPU:
    python sdpg.py
    python sdpg.py --beta 0 --alpha 0
    python sdpg.py --model ./my-model --task ./problems.jsonl --device cpu
Resume, and DDP on 8 GPUs (README.md: several nodes):
    python sdpg.py --resume out/checkpoint-100
    torchrun --nproc_per_node=8 sdpg.py"""
import argparse
import collections
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from fractions import Fraction

import torch
import torch.distributed as dist
from tqdm import tqdm

COMPILES = collections.Counter()  # graphs compiled per function in this process (metrics.jsonl)


def opt(default, help, **valid):
    """A flag: default, help, valid values (low, high inclusive; above exclusive; choices) for check_flags;
    free=True: a resumed run may change it, as it cannot change the update."""
    return dataclasses.field(default=default, metadata=dict(help=help, **valid))


@dataclasses.dataclass
class Config:
    # model and data
    model: str = opt("Qwen2.5-0.5B", "Hub id, bare Qwen2.5/Qwen3 name, or local directory")
    task: str = opt("gsm8k", "'gsm8k', or a .jsonl/.json/.parquet of question/answer[/context] or verl rows")
    eval_task: str = opt("", "comma-separated evaluation sets (default: gsm8k's test, or --task)", free=True)
    answer_format: str = opt("boxed", "'boxed' (Figure 4) or 'hash' (a final '#### N'): prompt and verifier",
                             choices=("boxed", "hash"))
    out_dir: str = opt("out", "for metrics.jsonl, checkpoint-<step>/ (resume: the checkpoint's)", free=True)
    seed: int = opt(0, "random seed (each DDP rank adds its rank)")
    device: str = opt("auto", "'auto' (cuda if present), 'cuda' or 'cpu'", choices=("auto", "cuda", "cpu"))
    # rollouts (Algorithm 1, lines 3-5)
    batch_size: int = opt(128, "prompts per step, over all ranks", low=1)
    group_size: int = opt(8, "G: sampled responses per prompt", low=1)
    max_prompt_tokens: int = opt(2048, "skip prompts longer than this (the teacher's, with c, too)", low=1)
    max_response_tokens: int = opt(512, "max new tokens per response (the paper uses 4096)", low=1)
    temperature: float = opt(1.0, "sampling temperature (in the loss: the student's logits only)", above=0)
    sample_memory_mb: float = opt(16384.0, "MB for the sampler's KV cache and logits", above=0)
    # objective (Eq. 2.1, 3.1-3.5, A.3)
    alpha: float = opt(1e-3, "reference-KL coefficient alpha (0: no reference model)", low=0)
    beta: float = opt(1e-3, "distillation coefficient beta_base (0: no teacher forward)", low=0)
    beta_warmup: int = opt(-1, "T_warm in steps (-1: T/8, the paper's 50 of 400; 0: no warmup)", low=-1)
    beta_decay: int = opt(-1, "T_decay in steps (-1: 7T/8, the paper's 350 of 400; 0: no decay)", low=-1)
    kl_mode: str = opt("urkl", "reference-KL surrogate: urkl (SDPG-URKL) or ufkl", choices=("urkl", "ufkl"))
    kl_reward: float = opt(0.0, "KL penalty in the reward: R_i - coef sum_t k1_t (Table 1's GRPO)", low=0)
    gate: bool = opt(True, "distil only responses with A > 0 (Eq. 3.5)")
    eps_low: float = opt(0.2, "lower clip of the importance ratio", low=0, high=1)
    eps_high: float = opt(0.28, "upper clip of the importance ratio (DAPO clip-higher)", low=0)
    clip_c: float = opt(10.0, "dual-clip constant c for A < 0", low=1)
    rlsd_lambda: float = opt(0.0, "RLSD's lambda (App. B; 0: off): weight of the reweighted A", low=0, high=1)
    rlsd_decay: int = opt(50, "T_lambda: RLSD's lambda falls linearly to 0 at this step (0: constant)", low=0)
    rlsd_eps_w: float = opt(0.2, "RLSD's evidence weight clipped to [1 - eps_w, 1 + eps_w]", low=0, high=1)
    # optimisation
    total_steps: int = opt(400, "T: training steps", low=1)
    lr: float = opt(1e-6, "AdamW learning rate", low=0)
    weight_decay: float = opt(0.1, "AdamW weight decay", low=0)
    grad_clip: float = opt(1.0, "max global gradient norm", above=0)
    lr_warmup: int = opt(10, "steps of linear learning-rate warmup", low=0)
    ppo_minibatches: int = opt(8, "optimizer steps per rollout batch (>1 makes rho differ from 1)", low=1)
    micro_batch_tokens: int = opt(16384, "token budget (prompt + response, padded) per micro-batch", low=1)
    head_memory_mb: int = opt(2048, "memory budget (MB) of the fused head's logit chunk", low=1)
    grad_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    ref_dtype: str = opt("auto", "'auto' (bf16 on CUDA, else or with --kl-reward fp32), 'bf16' or 'fp32'",
                         choices=("auto", "bf16", "fp32"))
    max_bad_steps: int = opt(5, "abort after this many non-finite updates in a row", low=1, free=True)
    # evaluation (on a fork of the RNG: it never moves a rollout), logging, checkpoints
    eval_every: int = opt(50, "evaluation every N steps (0: only at start and end)", low=0, free=True)
    eval_samples: int = opt(1, "k of mean@k at --temperature (1: greedy; the paper: 32)", low=1, free=True)
    eval_n: int = opt(0, "evaluate on the first N problems (0: all)", low=0, free=True)
    report_to: str = opt("none", "also log to trackio or wandb", choices=("none", "trackio", "wandb"),
                         free=True)
    run_name: str = opt("", "the tracker's run (default: out-dir name and start time)", free=True)
    save_every: int = opt(100, "checkpoint every N steps (0: only at the end)", low=0, free=True)
    keep_checkpoints: int = opt(0, "keep the last N checkpoints (0: all, else >= 2)", low=0, free=True)
    resume: str = opt("", "checkpoint to continue from, with its recorded flags", free=True)


class UserError(Exception):
    """Bad input: reported as one line on stderr with exit code 2, never a traceback."""


def first_line(e):
    """An exception as one line, for UserError messages."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# --- Helpers: timing, torch.compile on CUDA, ranks (a plain `python sdpg.py` has no torch.distributed) ------
@contextlib.contextmanager
def timed(timings, key, device):
    """Adds the block's seconds to timings[key], on CUDA after a synchronisation: the phase's time."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    yield
    sync()
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def cuda_compiled(fn, devices=("cuda",), **options):
    """fn through torch.compile on CUDA, else eagerly; a failed compile says why once, and fn runs eagerly."""
    def call(*args):
        if call.compiled and next(a for a in args if torch.is_tensor(a)).device.type in devices:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            # for fn's calls alone: past the limit dynamo raises, where it would run fn eagerly unsaid
            limit = max(call.graphs, torch._dynamo.config.recompile_limit)
            try:
                call.compiled_ran = True  # cleared below where compiling fails
                with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
                    return call.compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # a compiler error, not fn's: fn then runs eagerly for good
                reason = first_line(getattr(e, "inner_exception", e))  # the backend's own error
                print(f"notice: {fn.__name__} runs eagerly, compiling failed: {reason}", file=sys.stderr)
                call.compiled, call.compiled_ran = None, False
            finally:
                COMPILES[fn.__name__] += torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        return fn(*args)
    call.compiled, call.compiled_ran, call.graphs = torch.compile(fn, **options), False, 0
    return call


def distributed():
    return dist.is_available() and dist.is_initialized()


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def all_reduce(t, op="SUM"):
    if distributed():
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t


# --- Data: problems x with privileged context c, and the prompts of Figure 4 --------------------------------
ANSWER_FORMATS = {  # Figure 4's answer sentences, and GSM8K's '####' in their place (--answer-format)
    "boxed": ("Present your final answer inside \\boxed{}, for example \\boxed{42}.",
              "Remember to put your final answer inside \\boxed{}."),
    "hash": ("Present your final answer after ####, for example #### 42.",
             "Remember to put your final answer after ####."),
}
STUDENT_PROMPT = "Solve the following math problem step by step. {0}\n{question}\n{1}"
TEACHER_CONTEXT = "[TEACHER_CONTEXT_TOKEN]"  # the student sees the text before it, the teacher all of it
HINT = "\n[Hint] The correct answer is {answer}."
HINT_SOLUTION = (" A common way to solve this is:\n{solution}\n[Instruction] If possible, derive the answer "
                 "{answer} using an alternative, equally rigorous mathematical approach (e.g., algebraic vs "
                 "geometric, or different substitution). If no alternative exists, articulate the standard "
                 "approach with exceptional clarity. Do NOT state that you were given the answer or "
                 "reference.")


def resolve_model_name(name):
    """A bare Qwen name ('Qwen2.5-0.5B') becomes its Hub id; a local path must be a model directory."""
    if os.path.isfile(name) or (os.path.isdir(name) and not os.path.isfile(f"{name}/config.json")):
        raise UserError(f"--model {name!r} is not a model directory (one with a config.json)")
    if not os.path.isdir(name) and re.fullmatch(r"(Qwen2\.5|Qwen3)(-[\w.]+)+", name):
        return "Qwen/" + name
    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UserError(f"model path {name!r} does not exist")
    return name


def load_problems(task, split):
    """Rows of {messages, answer}, each user turn holding TEACHER_CONTEXT before the privileged context c."""
    if task == "gsm8k":
        try:
            import datasets  # imported only where a Hub data set is loaded
            rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
        except Exception as e:  # no `datasets`, no network, ...
            raise UserError(f"cannot load openai/gsm8k ({split}; without the Hub, HF_HUB_OFFLINE=1 fails at "
                            f"once): {first_line(e)}") from None
        rows = [dict(r, context=re.sub(r"<<[^>]*>>", "", r["answer"].rsplit("####", 1)[0]).strip())
                for r in rows]  # the context: the solution without its '#### N' and <<48/2=24>> notes
    elif not task.endswith((".jsonl", ".json", ".parquet")):
        raise UserError(f"unknown task {task!r}: use 'gsm8k' or a .jsonl, .json or .parquet file")
    elif not os.path.isfile(task):
        raise UserError(f"data file {task!r} does not exist")
    else:
        try:
            if task.endswith(".parquet"):
                import datasets
                rows = list(datasets.load_dataset("parquet", data_files=task, split="train"))
            else:
                with open(task) as f:
                    text = f.read()
                # JSONL as one array, a line per row (blank: null), so an error names the file's line
                lines = (x if x.strip() else "null" for x in text.splitlines())
                rows = json.loads(text if task.endswith(".json") else "[" + ",\n".join(lines) + "]")
        except (ValueError, OSError) as e:
            raise UserError(f"cannot read {task}: {first_line(e)}") from None
    if not isinstance(rows, list):
        raise UserError(f"{task} holds a JSON {type(rows).__name__}, not a list of problems")
    if not any(r is not None for r in rows):
        raise UserError(f"{task} holds no problems")
    problems = []
    for i, r in enumerate(rows):  # row i + 1: the line of a .jsonl
        if r is None:
            continue
        if isinstance(r, dict) and isinstance(r.get("prompt"), list):  # verl's format
            answer, messages = str((r.get("reward_model") or {}).get("ground_truth", "")), r["prompt"]
        elif isinstance(r, dict) and "question" in r and "answer" in r:
            # Figure 4's user turn: student prompt, marker, hint c (without a solution: its first sentence)
            answer, solution = str(r["answer"]).rsplit("####", 1)[-1].strip(), str(r.get("context") or "")
            hint = (HINT + HINT_SOLUTION if solution else HINT).format(answer=answer, solution=solution)
            prompt = STUDENT_PROMPT.format(*ANSWER_FORMATS["boxed"], question=r["question"])
            messages = [dict(role="user", content=prompt + TEACHER_CONTEXT + hint)]
        else:
            raise UserError(f"{task}: row {i + 1} has neither question/answer nor a verl prompt")
        if reference_answer(answer) is None:
            raise UserError(f"{task}: row {i + 1} has a reference answer that cannot be parsed: {answer!r}")
        problems.append(dict(messages=[dict(m) for m in messages], answer=answer))
    return problems


def chat_prompt(tokenizer, messages):
    """Token ids of the chat plus the assistant header (plain text without a chat template)."""
    text = (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if tokenizer.chat_template else "\n".join(m["content"] for m in messages) + "\n")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_context(messages, answer_format="boxed"):
    """(student, teacher) chats, as the authors' rl_dataset: the student's turn stops at TEACHER_CONTEXT."""
    student, teacher = [], []
    for m in messages:
        text = m["content"]
        for boxed, other in zip(ANSWER_FORMATS["boxed"], ANSWER_FORMATS[answer_format]):
            text = text.replace(boxed, other)
        before, _, context = text.partition(TEACHER_CONTEXT)
        student.append(dict(m, content=before))
        teacher.append(dict(m, content=before + context))
    return student, teacher


def build_prompts(tokenizer, problems, max_tokens, with_teacher, answer_format="boxed"):
    """Student prompt x and teacher prompt (c, x) per problem; those over the limit are skipped."""
    kept = []
    for p in problems:
        student_chat, teacher_chat = split_context(p["messages"], answer_format)
        student = chat_prompt(tokenizer, student_chat)
        teacher = chat_prompt(tokenizer, teacher_chat) if with_teacher else None
        if max(len(student), len(teacher or [])) <= max_tokens:
            kept.append(dict(p, student_ids=student, teacher_ids=teacher))
    if len(kept) < len(problems):
        print(f"warning: skipped {len(problems) - len(kept)} of {len(problems)} prompts longer "
              f"than --max-prompt-tokens {max_tokens}", file=sys.stderr)
    return kept


# --- Rollouts: G responses per prompt from the unprivileged policy (Algorithm 1, line 5) --------------------
def stop_token_ids(tokenizer, model):
    """EOS and the chat end-of-turn: for Qwen both <|endoftext|> and <|im_end|>."""
    eos, vocab = model.generation_config.eos_token_id, tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    ids |= {vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t in vocab}
    return sorted(i for i in ids if i is not None)


def cut_at_stop(tokens, stop_ids):
    """(tokens up to and including the first stop token, truncated): never by `!= pad_id` (pad may be EOS)."""
    end = next((j for j, t in enumerate(tokens) if t in stop_ids), None)
    return (tokens, True) if end is None else (tokens[: end + 1], False)


def sample_token(logits, temperature, greedy=False):
    """An exponential race: argmax_a p(a) / E_a, E_a ~ Exp(1), picks a with probability p(a); no host sync."""
    if greedy:
        return logits.argmax(-1)                                                  # (B,)
    probs = torch.softmax(logits.float() / temperature, dim=-1)                   # (B, V)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)           # (B,)


def decode_step(model, cache_kwarg, tokens, positions, cache_position, mask, temperature, greedy):
    """Feed each row's last token at its position; return the next tokens: (B,) -> (B,)."""
    logits = model(input_ids=tokens[:, None], position_ids=positions[:, None], attention_mask=mask,
                   cache_position=cache_position, **cache_kwarg).logits[:, -1]                # (B, V)
    return sample_token(logits, temperature, greedy)


# on CUDA a decode step replays as one captured graph, compiled once a set: generate fixes rows and slots
graphed_decode_step = cuda_compiled(decode_step, mode="reduce-overhead", dynamic=False)


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """One new token a row: a K/V head's g query heads attend as its g query rows (K/V never repeated)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    b, heads, q_len, dim = query.shape                                          # (B, h, 1, D)
    if q_len != 1:  # the prefill: transformers' own SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    grouped = query.reshape(b, key.shape[1], heads // key.shape[1], dim)        # (B, h_kv, g, D)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                           scale=scaling)      # (B, h_kv, g, D)
    return out.reshape(b, 1, heads, dim), None                                  # (B, 1, h, D)


@torch.no_grad()
def decode_rows(model, prompts, live, cfg, pad_id, stop_ids, greedy, prompt_len):
    """(B, prompt) ids, left-padded to prompt_len -> (B, N) tokens: one prefill into a static KV
    cache, one decode step per token. Rows from `live` on only keep the shape: stopped from the start."""
    from transformers import StaticCache
    device = next(model.parameters()).device
    B, P, N = len(prompts), prompt_len, cfg.max_response_tokens
    L = -(-(P + N) // 16) * 16                                                           # cache slots
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], device=device)   # (B, P)
    start = P - torch.tensor([len(p) for p in prompts], device=device)                  # (B,) first token
    slots = torch.arange(L, device=device)                                              # (L,) cache positions
    mask = (slots >= start[:, None]).long()                                             # (B, L) left pads 0
    positions = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)                               # (B, P)
    stops = torch.tensor(stop_ids, device=device)
    done = torch.arange(B, device=device) >= live                                       # (B,)
    caches = model.__dict__.setdefault("sdpg_kv_caches", {})  # (rows, slots) -> StaticCache
    if (B, L) not in caches:
        caches[B, L] = StaticCache(config=model.config, max_cache_len=L)
    caches[B, L].reset()  # one cache a shape, reset per prefill: it and its CUDA graph serve the whole run
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache_kwarg = {name: caches[B, L]}  # `cache` from transformers 5.24 on (`past_key_values` deprecated)
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        try:  # the prefill's (B, V) logits go once the first token is drawn
            tokens = sample_token(model(input_ids=ids, attention_mask=mask[:, :P], position_ids=positions,
                                        cache_position=slots[:P], logits_to_keep=1,
                                        **cache_kwarg).logits[:, -1], cfg.temperature, greedy)   # (B,)
        except (TypeError, ValueError, NotImplementedError) as e:
            raise UserError(f"cannot sample from model type {model.config.model_type!r} with a static KV "
                            f"cache: {first_line(e)}") from None
        out = torch.full((B, N), pad_id, device=device)                                 # (B, N)
        first = positions[:, -1] + 1                                                    # (B,)
        for t in range(N):
            out[:, t] = torch.where(done, pad_id, tokens)  # a stopped row never changes again
            done |= torch.isin(tokens, stops)
            if t == N - 1 or (t % 16 == 15 and bool(done.all())):  # one host sync per 16 tokens
                break
            torch.compiler.cudagraph_mark_step_begin()  # a new replay of the captured graph (CUDA)
            tokens = graphed_decode_step(model, cache_kwarg, tokens, first + t, slots[P + t:P + t + 1], mask,
                                         cfg.temperature, greedy).clone()               # (B,)
    return out.tolist()


def sampler_row_bytes(model, slots):
    """A sampling row's peak bytes: K/V cache, the prefill's K/V over all heads, logits, 3 fp32 (row, V)."""
    c, element = model.config, next(model.parameters()).element_size()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", c.num_attention_heads)
    kv = 2 * head_dim * slots * (c.num_hidden_layers * kv_heads + c.num_attention_heads)  # cache, repeated
    return element * kv + (element + 3 * 4) * c.vocab_size


def generate(model, prompts, cfg, pad_id, stop_ids, greedy=False, desc="sample", prompt_len=None):
    """Responses (stop token included) and truncation flags, in calls of one shape, as many rows as fit."""
    model.eval()  # the policy itself samples on the CPU: a training flag would be a new graph
    prompt_len = prompt_len or max(map(len, prompts), default=0)
    row_bytes = sampler_row_bytes(model, prompt_len + cfg.max_response_tokens + 16)
    rows = max(1, min(int(cfg.sample_memory_mb * 2**20) // row_bytes, len(prompts)))  # an empty set: no call
    cut = []                                  # (response, truncated) per prompt
    for i in tqdm(range(0, len(prompts), rows), desc=desc, leave=False, disable=rank_and_world()[0] != 0):
        chunk = prompts[i: i + rows]
        filled = chunk + chunk[:1] * (rows - len(chunk))
        out = decode_rows(model, filled, len(chunk), cfg, pad_id, stop_ids, greedy, prompt_len)
        cut += [cut_at_stop(row, stop_ids) for row in out[:len(chunk)]]
    return [tokens for tokens, _ in cut], [truncated for _, truncated in cut]


def sampling_policy(model):
    """On CUDA a bf16 copy of the policy, refreshed in place after each update; else the policy."""
    if not next(model.parameters()).is_cuda:
        return model
    copy = __import__("copy").deepcopy(model).requires_grad_(False).eval()
    for p in copy.parameters():  # parameters only: rotary inv_freq buffers stay fp32
        p.data = p.data.to(torch.bfloat16)
    known = copy.config.model_type in ("qwen2", "qwen3", "llama", "mistral")  # plain GQA, one head size
    return use_decode_attention(copy) if known else copy


def use_decode_attention(model):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("sdpg_decode", decode_attention)
    AttentionMaskInterface.register("sdpg_decode", sdpa_mask)
    model.config._attn_implementation = "sdpg_decode"
    return model


# --- Verifier: binary reward from the final answer (Algorithm 1, line 7) ------------------------------------
NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"   # 1,234.5 | 12 | 12. | .5 ; never 2,5
SIGNED = re.compile(rf"([+-]?)({NUMBER})")
FRACTION = re.compile(r"([+-]?)(?:\\frac\{([+-]?\d+)\}\{(\d+)\}|(\d+)/(\d+))")
TEXT = r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}"
# unit words after a number go, as in the authors' normalisation (a fixed list: '2 \pi', '3 x' stay)
UNITS = re.compile(r"(?<=\d)\s*(?:(?:square|sq)\s*)?(?:dollars?|cents?|mph|km|cm|mm|m|meters?|inch(?:es)?|"
                   r"feet|foot|ft|miles?|hours?|minutes?|seconds?|days?|weeks?|years?|pounds?|lbs?|kg|g|"
                   r"grams?|degrees?|units?|ways|points?|digits?|integers?|students?|edges?)\.?$")


def closing_brace(text, start):
    """Index of the '}' that closes a '{' opened just before text[start], or None."""
    depth = 1
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return j


def final_answer(text, answer_format="boxed"):
    """The final answer as written, or None: as the authors' boxed scorer, or the line after the last ####."""
    if answer_format == "hash":  # of GSM8K's '#### 12 apples', the leading number
        line = text.rsplit("####", 1)[1].strip().split("\n")[0] if "####" in text else None
        number = line and re.match(rf"[-+$\s]*(?:{NUMBER})(?![\d,/])", line)
        return number[0] if number else line
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]  # balanced braces
    end = closing_brace(text, starts[-1]) if starts else None
    if end is not None:
        return text[starts[-1]:end]
    lines = re.findall(r"(?i)Answer[ \t]*:[ \t]*([^\n]+)", text)
    return lines[-1].strip(" *") if lines else None


def normalise(answer):
    """An exact Fraction where the answer is a number ('$1,000.' 1000, '- .5' -1/2, '\\dfrac{3}{4}'
    3/4, '12\\text{ cm}' 12, 'x = 2' 2), else a canonical string; None where nothing is left."""
    s = answer.replace("\u2212", "-")
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\$", "$", "^\\circ", "^{\\circ}", "\u00b0"):
        s = s.replace(junk, "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s).split("=")[-1]
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)  # \sqrt2, \frac12: braces as in \sqrt{2}, \frac{1}{2}
    s = re.sub(r"\\frac\s*(\w|\{[^{}]*\})\s*(\w|\{[^{}]*\})",
               lambda m: "\\frac" + "".join(a if a[0] == "{" else "{" + a + "}" for a in m.groups()), s)
    candidates = []
    for candidate in (re.sub(TEXT, r"\1", s), re.sub(TEXT, "", s)):  # \text{5}, 5\text{ cm}
        candidate = re.sub(r"\s+", "", UNITS.sub("", candidate.strip().rstrip("."))).rstrip(".")
        while candidate[:1] == "{" and closing_brace(candidate, 1) == len(candidate) - 1:
            candidate = candidate[1:-1]  # {5}, {{x+1}}: braces around the whole answer
        if m := SIGNED.fullmatch(candidate):
            return Fraction(m[1] + m[2].replace(",", ""))
        if (m := FRACTION.fullmatch(candidate)) and int(m[3] or m[5]) != 0:
            return Fraction(int(m[2] or m[4]), int(m[3] or m[5])) * (-1 if m[1] == "-" else 1)
        candidates.append(candidate)
    return candidates[0] or None


def reference_answer(reference):
    """The normalised reference, from a plain answer or a GSM8K solution ending in '#### N'."""
    return normalise(reference.rsplit("####", 1)[-1])


def reward(response, reference, answer_format="boxed"):
    """R = +1 if the final answer equals the reference (exact numbers, else normalised strings), else -1."""
    predicted = normalise(final_answer(response, answer_format) or "")  # None: no final answer
    return 1.0 if predicted is not None and predicted == reference_answer(reference) else -1.0


# --- The objective, one function per equation ---------------------------------------------------------------
def group_advantages(rewards, group_size, eps_std=1e-6):
    """Eq. 2.1: A_i = (R_i - mean_G) / (std_G + eps_std), std unbiased as the authors'; groups contiguous."""
    r = rewards.view(-1, group_size).to(torch.float64)                # (B, G)
    if group_size == 1:  # verl's mean 0 and std 1 for a group of one: A_i = R_i / (1 + eps_std)
        return (r / (1 + eps_std)).view(-1).to(rewards.dtype)
    std = r.std(dim=1, keepdim=True)                                    # (B, 1)
    adv = (r - r.mean(dim=1, keepdim=True)) / (std + eps_std)           # (B, G)
    return torch.where(std > 0, adv, 0.0).view(-1).to(rewards.dtype)   # (B*G,)


def kl_in_reward(old_logp, ref_logp, coef):
    """Table 1's GRPO, verl's KL in the reward: coef sum_t (log pi_old - log pi_ref), (S,) on the CPU."""
    return torch.stack([coef * (old - ref).sum() for old, ref in zip(old_logp, ref_logp)]).cpu()  # (S,)


def positive_advantage_gate(advantages):
    """Eq. 3.5: m_i = 1[A_i > 0], distil only the responses the verifier endorses."""
    return (advantages > 0).float()


def beta_schedule(step, total_steps, beta, warmup_steps, decay_steps):
    """Section 3.5.2: beta(k) = beta * min(1, k/T_warm) * min(1, (T-k)/T_decay); a T of 0 drops its factor."""
    warm = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    decay = min(1.0, (total_steps - step) / decay_steps) if decay_steps > 0 else 1.0
    return beta * max(0.0, warm) * max(0.0, decay)


def ref_kl_penalty(logp, ref_logp, mode="urkl"):
    """Section 3.4 / A.2: per-token surrogate f(log w) of the reference KL on sampled tokens, log w = log
    pi_theta(y_t) - log pi_ref(y_t); its gradient is the KL's REINFORCE coefficient, 0 at w = 1."""
    log_w = logp - ref_logp
    if mode == "urkl":
        return 0.5 * log_w ** 2                # unnormalised reverse KL: (1/2) log^2 w
    if mode == "ufkl":
        return torch.exp(-log_w) + log_w - 1   # unnormalised forward KL: 1/w + log w - 1
    raise ValueError(f"unknown kl mode {mode!r}")


def rlsd_advantages(advantages, teacher_logp, old_logp, lam, eps_w):
    """Appendix B (RLSD): A_t = (1 - lam) A_i + lam A_i clip(w_t, 1 - eps_w, 1 + eps_w), w_t = exp(sign(A_i)
    Delta_t), Delta_t = SG[log pi_old(y_t | c, x) - log pi_old(y_t | x)]; both in [-20, 20] (the authors')."""
    delta = (teacher_logp - old_logp).nan_to_num(0.0).clamp(-20.0, 20.0)
    weight = torch.exp((torch.sign(advantages) * delta).clamp(-20.0, 20.0))
    return (1 - lam) * advantages + lam * (advantages * weight.clamp(1 - eps_w, 1 + eps_w)), delta, weight


def rlsd_lambda_schedule(step, lam, decay_steps):
    """RLSD's lambda_k = lam max(0, 1 - k/T_lambda), the authors' decay (T_lambda = 0: App. B's constant)."""
    return (lam * max(0.0, 1 - step / decay_steps)) if decay_steps > 0 else lam


def importance_ratio(logp, old_logp):
    """rho = pi / pi_old, its log-ratio clamped to [-20, 20] before exp as in the authors' code."""
    return torch.exp((logp - old_logp).clamp(-20.0, 20.0))


def dual_clip_pg_loss(logp, old_logp, advantages, eps_low=0.2, eps_high=0.28, clip_c=10.0):
    """Appendix A.3 (DAPO clip-higher with dual clip), per token: l = max(-A rho, -A clip(rho, 1-eps_low,
    1+eps_high)); where A < 0, l = min(l, -A c). On-policy rho = 1: the -A grad log pi of Section 3.2."""
    ratio = importance_ratio(logp, old_logp)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps_low, 1 + eps_high))
    return torch.where(advantages < 0, torch.minimum(loss, -advantages * clip_c), loss)


def sampled_token_loss(logp, old_logp, ref_logp, advantages, alpha, kl_mode, eps_low, eps_high, clip_c):
    """The sampled-token part of Eq. A.3: dual-clip loss + alpha SG[rho] f_K(log w); None: rho = 1, no f_K."""
    old_logp = logp.detach() if old_logp is None else old_logp
    loss = dual_clip_pg_loss(logp, old_logp, advantages, eps_low, eps_high, clip_c)
    if alpha and ref_logp is not None:
        rho = importance_ratio(logp.detach(), old_logp)
        loss = loss + alpha * rho * ref_kl_penalty(logp, ref_logp, kl_mode)
    return loss


def logit_stats(student_logits, teacher_logits, tokens, temperature=1.0):
    """Per row of a chunk (c, V): log pi(y_t), entropy, Eq. 3.2's exact KL_t = sum_a p(a) log(p(a) / q(a)) (0
    without a teacher), the log-normalisers. The temperature divides only the student's logits, as theirs."""
    fdt = torch.promote_types(student_logits.dtype, torch.float32)
    z = student_logits.to(fdt) / temperature                              # (c, V)
    lse_p = z.logsumexp(-1)                                               # (c,)
    logp = z - lse_p[:, None]                                             # (c, V)
    p = logp.exp()                                                        # (c, V)
    entropy = -(p * logp).sum(-1)                                         # (c,)
    tok_logp = logp.gather(1, tokens[:, None]).squeeze(1)                 # (c,)
    if teacher_logits is None:
        return tok_logp, entropy, torch.zeros_like(lse_p), lse_p, lse_p
    zq = teacher_logits.to(fdt)                                           # (c, V)
    lse_q = zq.logsumexp(-1)                                              # (c,)
    kl = (p * (logp - (zq - lse_q[:, None]))).sum(-1)                     # (c,)
    return tok_logp, entropy, kl, lse_p, lse_q


def logit_grad(student_logits, teacher_logits, tokens, lse_p, lse_q, kl, kl_coef, logp_coef,
               temperature=1.0, grad_dtype=None):
    """d loss / d logits of one chunk, for loss = kl_coef * KL_t + (terms in log pi(y_t)). Proposition 3.1,
    the teacher detached: dKL_t/dz = p * (log p - log q - KL_t) = -p * A_dist, A_dist = SG[KL_t - log(p/q)];
    sampled tokens: d log pi(y_t)/dz = (onehot(y_t) - p) logp_coef. -> (c, V) in grad_dtype or the logits'."""
    fdt = torch.promote_types(student_logits.dtype, torch.float32)
    logp = student_logits.to(fdt) / temperature - lse_p[:, None]          # (c, V)
    p = logp.exp()                                                        # (c, V)
    grad = -logp_coef[:, None] * p                                        # (c, V)
    if teacher_logits is not None:
        logq = teacher_logits.to(fdt) - lse_q[:, None]                    # (c, V)
        grad = grad + kl_coef[:, None] * p * (logp - logq - kl[:, None])  # Prop. 3.1
    onehot = torch.arange(p.shape[1], device=p.device) == tokens[:, None]  # (c, V) bool
    return torch.where(onehot, grad + logp_coef[:, None], grad).to(grad_dtype or student_logits.dtype)


fused_logit_stats = cuda_compiled(logit_stats, dynamic=True)  # on CUDA fused: no (chunk x V) temporaries
fused_logit_grad = cuda_compiled(logit_grad, dynamic=True)
KL_CAP = 20.0  # the authors clamp KL_t at 20: such a token adds beta * 20 and no gradient


# --- The fused chunked head: the loss of Eq. A.3 without (tokens x vocab) logits ----------------------------
def fp32_logits(hidden, weight):
    """hidden @ weight.T, (c, H) x (V, H) -> (c, V), in fp32 (fp64 stays): bf16 would move log pi by 0.06."""
    if hidden.is_cuda and hidden.dtype == torch.bfloat16:
        return torch.mm(hidden, weight.T, out_dtype=torch.float32)
    return (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32))


def head_chunks(n, vocab_size, memory_mb, chunk_size=None):
    """(start, end) rows whose (chunk x V) buffers fit memory_mb: 10 bytes an entry compiled, 32 eagerly."""
    start = 0
    while start < n:
        compiled = fused_logit_stats.compiled_ran and fused_logit_grad.compiled_ran
        rows = chunk_size or max(1, int(memory_mb * 2**20) // (vocab_size * (10 if compiled else 32)))
        yield start, min(n, start + rows)
        start += rows


class FusedSDPGHead(torch.autograd.Function):
    """Forward: the loss and its gradients, chunk by chunk (four GEMMs); backward only scales them."""

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, tokens, advantages, kl_weight, old_logp,
                ref_logp, n_tokens, token_loss, temperature, memory_mb, chunk_size, matmul_dtype):
        n, dtype = student_hidden.shape[0], matmul_dtype or student_hidden.dtype
        fdt = torch.promote_types(dtype, torch.float32)
        w = weight.to(dtype)                                              # (V, H)
        grad_hidden = torch.empty(student_hidden.shape, dtype=dtype, device=w.device)  # (N, H)
        grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))  # fp32
        loss, stats = w.new_zeros((), dtype=fdt), w.new_zeros(3, n, dtype=fdt)  # stats: logp, KL, entropy
        scale = 1.0 / (n_tokens * temperature)                           # token mean; z = hW / T
        n_teacher = 0 if teacher_hidden is None else len(teacher_hidden)
        for s, e in head_chunks(n, weight.shape[0], memory_mb, chunk_size):
            h, y = student_hidden[s:e].to(dtype), tokens[s:e]             # (c, H), (c,)
            logits = fp32_logits(h, w)                                    # (c, V)  GEMM 1
            teacher_logits = None  # past the teacher's rows, whose kl_weight is 0
            if s < n_teacher:  # a chunk across the end: zero states (q uniform) for the rest
                t = torch.nn.functional.pad(teacher_hidden[s:e], (0, 0, 0, e - min(e, n_teacher)))
                teacher_logits = fp32_logits(t.to(dtype), w)              # (c, V)  GEMM 2
            tok_logp, entropy, kl, lse_p, lse_q = fused_logit_stats(logits, teacher_logits, y, temperature)
            # sampled-token terms: d/d log pi(y_t) by autograd on (c,), with the functions of the equations
            old = tok_logp if old_logp is None else old_logp[s:e]        # on-policy: rho = 1
            with torch.enable_grad():
                x = tok_logp.detach().requires_grad_()
                tok_loss = token_loss(x, old, None if ref_logp is None else ref_logp[s:e], advantages[s:e])
                (logp_coef,) = torch.autograd.grad(tok_loss.sum(), x)     # (c,)
            kl_coef = (kl_weight[s:e] * importance_ratio(tok_logp, old)).to(fdt)  # beta(k) m_i SG[rho]
            loss += tok_loss.detach().sum() + (kl_coef * kl.clamp(max=KL_CAP)).sum()
            kl_coef = kl_coef * (kl <= KL_CAP)                            # a capped KL has no gradient
            dz = fused_logit_grad(logits, teacher_logits, y, lse_p, lse_q, kl, kl_coef * scale,
                                  logp_coef.to(fdt) * scale, temperature, dtype)  # (c, V)
            grad_hidden[s:e] = dz @ w                                     # (c, H)  GEMM 3
            if dz.is_cuda and dz.dtype != grad_weight.dtype:  # bf16 GEMM summing into fp32
                torch.addmm(grad_weight, dz.T, h, out_dtype=grad_weight.dtype, out=grad_weight)  # GEMM 4
            else:
                grad_weight += dz.T @ h                                   # (V, H)  GEMM 4
            stats[:, s:e] = torch.stack([tok_logp, kl, entropy])
            del logits, teacher_logits, dz
        ctx.save_for_backward(grad_hidden.to(student_hidden.dtype), grad_weight.to(weight.dtype))
        return loss / n_tokens, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, None, grad_weight * grad_loss, *(None,) * 11  # 11 more inputs


def sdpg_head_loss(student_hidden, teacher_hidden, weight, tokens, advantages, kl_weight, old_logp,
                   ref_logp, n_tokens, *, alpha=1e-3, kl_mode="urkl", eps_low=0.2, eps_high=0.28,
                   clip_c=10.0, temperature=1.0, chunk_size=None, memory_mb=2048, matmul_dtype=None):
    """The SDPG loss (Eq. 3.1 in the form of A.3) on N response tokens, summed / n_tokens (all ranks').
    States (N, H) with grad, the teacher's of the first N_t rows or None; weight (V, H); per token (N,):
    tokens, A_i, beta(k) m_i, old_logp (None: rho = 1), ref_logp. -> loss, stats (3, N): logp, KL, entropy."""
    token_loss = lambda *scores: sampled_token_loss(*scores, alpha, kl_mode, eps_low, eps_high, clip_c)
    return FusedSDPGHead.apply(student_hidden, teacher_hidden, weight, tokens, advantages, kl_weight,
                               old_logp, ref_logp, n_tokens, token_loss, temperature, memory_mb, chunk_size,
                               matmul_dtype)


# --- The update: hidden states (never logits), Eq. 3.1 over the batch, one token-mean, AdamW ------------
def response_hidden(model, prompts, responses, pad_id):
    """Final-norm hidden states that predict each response token, (sum |y_i|, H), of [prompt | response]."""
    device = next(model.parameters()).device
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)   # (b, L)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    rows = torch.cat([i * width + torch.arange(len(p) - 1, len(p) - 1 + len(r))
                      for i, (p, r) in enumerate(zip(prompts, responses))]).to(device)  # (N,)
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):  # bf16 GEMMs, fp32 weights
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[rows]                                   # (N, H)


def micro_batches(prompts, responses, indices, token_budget):
    """Consecutive runs of `indices` whose padded rows (count x longest prompt+response) fit the budget."""
    batches, current, longest = [], [], 0
    for i in indices:
        length = len(prompts[i]) + len(responses[i])
        if current and max(longest, length) * (len(current) + 1) > token_budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    return batches + [current] if current else batches


@dataclasses.dataclass
class Rollouts:
    """One step's samples, in group order: per sample on the CPU, per token on the model's device."""
    student_ids: list                  # prompt x
    teacher_ids: list                  # prompt (c, x), or None without a teacher
    response_ids: list                 # y_i
    advantages: torch.Tensor = None    # (S,) A_i
    kl_weight: torch.Tensor = None     # (S,) beta(k) m_i
    ref_logp: list = None              # S tensors (|y_i|,), or None without a reference
    old_logp: list = None              # S tensors (|y_i|,), or None on-policy

    def per_token(self, values, samples, device):
        """values[i] of the samples (one a sample, or (|y_i|,)) as one (n,) on the device, in one crossing."""
        return torch.cat([values[i].expand(len(self.response_ids[i])) for i in samples]).to(device)


@torch.no_grad()
def score_tokens(model, prompts, responses, cfg, pad_id):
    """log pi(y_t | prompt, y<t), (|y_i|,) per response, at the sampling temperature, by the head's chunks."""
    model.eval()  # pi_old is the policy, left in training mode by the last update
    weight, out = model.get_output_embeddings().weight, []
    w = weight.to(torch.bfloat16) if weight.is_cuda else weight                     # (V, H)
    for mb in micro_batches(prompts, responses, range(len(responses)), cfg.micro_batch_tokens):
        resp = [responses[i] for i in mb]
        hidden = response_hidden(model, [prompts[i] for i in mb], resp, pad_id).to(w.dtype)  # (n, H)
        tokens = torch.tensor(sum(resp, []), device=weight.device)                         # (n,)
        logp = [fused_logit_stats(fp32_logits(hidden[s:e], w), None, tokens[s:e], cfg.temperature)[0]
                for s, e in head_chunks(len(tokens), w.shape[0], cfg.head_memory_mb)]     # (c,) each
        out.extend(torch.cat(logp).float().split([len(r) for r in resp]))
    return out


def update_policy(model, optimizer, rollouts, cfg, pad_id):
    """Eq. 3.1 in --ppo-minibatches optimizer steps, each a token-mean over its micro-batches and ranks."""
    weight = model.get_output_embeddings().weight
    params = [p for p in model.parameters() if p.requires_grad]
    device, dtype = weight.device, (torch.bfloat16 if weight.is_cuda else None)
    sums, r = collections.defaultdict(float), rollouts
    model.train()
    # equal steps on every rank; distilled (beta(k) m_i != 0) samples first: the teacher GEMM stops past them
    for minibatch in torch.tensor_split(torch.arange(len(r.response_ids)), cfg.ppo_minibatches):
        minibatch = sorted(minibatch.tolist(), key=lambda i: bool(r.kl_weight[i] == 0))
        n_tokens = sum(len(r.response_ids[i]) for i in minibatch)
        n_tokens = all_reduce(torch.tensor(float(n_tokens), device=device)).item()  # over all ranks
        loss_sum = torch.zeros((), device=device)
        for idx in micro_batches(r.student_ids, r.response_ids, minibatch, cfg.micro_batch_tokens):
            resp, gated = [r.response_ids[i] for i in idx], [i for i in idx if r.kl_weight[i] != 0]
            tokens = torch.tensor(sum(resp, []), device=device)                    # (n,)
            adv, kl_w = r.per_token(r.advantages, idx, device), r.per_token(r.kl_weight, idx, device)  # (n,)
            teacher = None
            if gated:
                with timed(sums, "teacher_s", device), torch.no_grad():
                    teacher = response_hidden(model, [r.teacher_ids[i] for i in gated], resp[:len(gated)],
                                              pad_id)                              # (n_g, H)
            ref = r.per_token(r.ref_logp, idx, device) if r.ref_logp else None     # (n,)
            old = r.per_token(r.old_logp, idx, device) if r.old_logp else None     # (n,)
            student = response_hidden(model, [r.student_ids[i] for i in idx], resp, pad_id)  # (n, H)
            loss, stats = sdpg_head_loss(
                student, teacher, weight, tokens, adv, kl_w, old, ref, n_tokens, alpha=cfg.alpha,
                kl_mode=cfg.kl_mode, eps_low=cfg.eps_low, eps_high=cfg.eps_high, clip_c=cfg.clip_c,
                temperature=cfg.temperature, memory_mb=cfg.head_memory_mb, matmul_dtype=dtype)
            loss.backward()
            loss_sum += loss.detach()
            logp, kl, entropy = stats.float()                                      # (n,) each
            log_rho = logp - old if old is not None else torch.zeros_like(logp)    # (n,)
            rho, distilled = log_rho.exp(), kl_w != 0                              # (n,) each
            clipped = ((adv > 0) & (rho > 1 + cfg.eps_high)) | ((adv < 0) & (rho < 1 - cfg.eps_low))
            ref_kl = ref_kl_penalty(logp, ref, cfg.kl_mode) if ref is not None else torch.zeros_like(logp)
            totals = dict(entropy=entropy, kl=kl * distilled, teacher_tokens=distilled, ref_kl=ref_kl,
                          approx_kl=rho - 1 - log_rho, clipped=clipped, tokens=torch.ones_like(logp))
            for key, value in zip(totals, torch.stack([v.sum() for v in totals.values()]).tolist()):  # a sync
                sums[key] += value
        # the loss / the global token count: summed over ranks, the global token-mean's gradient, exactly
        for p in params if distributed() else ():  # a parameter unused on this rank is still summed
            p.grad = all_reduce(torch.zeros_like(p) if p.grad is None else p.grad)
        loss_total = all_reduce(loss_sum).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        if math.isfinite(loss_total) and math.isfinite(grad_norm):
            optimizer.step()
            for key, value in (("loss", loss_total), ("grad_norm", grad_norm), ("steps", 1)):
                sums[key] += value
        else:
            sums["skipped"] += 1
        optimizer.zero_grad(set_to_none=True)  # sampling gets the gradients' memory back
    return sums


# --- Model loading, evaluation and checkpoints --------------------------------------------------------------
def load_pretrained(kind, path, **kwargs):
    try:
        return getattr(__import__("transformers"), kind).from_pretrained(path, **kwargs)
    except Exception as e:  # missing or bad files, no network, a converter's missing package, ...
        offline = "" if os.path.isdir(path) else " (without the Hub, HF_HUB_OFFLINE=1 fails at once)"
        raise UserError(f"cannot load {kind} from {path!r}{offline}: {first_line(e)}") from None


def check_plain_head(model):
    """The fused head computes logits as h @ W.T: refuse a model whose logits are anything else."""
    c, bias = model.config, getattr(model.get_output_embeddings(), "bias", None)
    scales = {getattr(c, "logit_scale", 1.0), getattr(c, "logits_scaling", 1.0)} - {None, 1.0}
    for reason, found in (("an lm_head bias", bias is not None), ("a logit scale", scales),
                          ("final-logit softcapping", getattr(c, "final_logit_softcapping", None))):
        if found:
            raise UserError(f"this model's logits are not h @ W.T ({reason}); the fused head cannot train it")


def evaluate(model, tokenizer, eval_sets, cfg, stop_ids, show=2):
    """accuracy/<set> (pass@1, or mean@k at --temperature) and their mean; the RNG forked: rollouts stay."""
    rank, world = rank_and_world()
    scores, held = {}, dict(getattr(model, "sdpg_kv_caches", {}))
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        for name, problems in eval_sets.items():
            mine = [p for p in problems for _ in range(cfg.eval_samples)][rank::world]
            longest = max(len(p["student_ids"]) for p in problems)  # one shape a set, whatever the rank
            responses, _ = generate(model, [p["student_ids"] for p in mine], cfg, tokenizer.pad_token_id,
                                    stop_ids, greedy=cfg.eval_samples == 1, desc="eval", prompt_len=longest)
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            correct = sum(reward(t, p["answer"], cfg.answer_format) > 0 for t, p in zip(texts, mine))
            totals = all_reduce(torch.tensor([correct, len(mine)], dtype=torch.float64, device=model.device))
            scores[f"accuracy/{name}"] = (totals[0] / totals[1].clamp(min=1)).item()
            for t, p in list(zip(texts, mine))[:show] if rank == 0 else []:
                tqdm.write(f"--- {name} sample (reference {p['answer']!r}):\n{t.strip()[:600]}")
    model.sdpg_kv_caches = held  # evaluation's caches go: one graph recording an evaluation, no memory held
    return dict(accuracy=sum(scores.values()) / len(scores), **scores)


def save_checkpoint(cfg, step, model, tokenizer, optimizer, scheduler, bad_steps):
    """<out>/checkpoint-<step> for AutoModelForCausalLM and --resume, renamed into place when whole."""
    rank, world = rank_and_world()
    # this rank's GPU only: get_rng_state_all would open a CUDA context on every GPU in every rank
    rngs = [dict(torch=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state() if model.device.type == "cuda" else None)] * world
    if distributed():
        dist.all_gather_object(rngs, rngs[rank])
        optimizer.consolidate_state_dict(to=0)  # ZeRO-1: every rank's AdamW shard, gathered on rank 0
    if rank == 0:
        final = os.path.join(cfg.out_dir, f"checkpoint-{step}")
        tmp = os.path.join(cfg.out_dir, f".tmp-checkpoint-{step}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(dict(step=step, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        rng=rngs, bad_steps=bad_steps, flags=dataclasses.asdict(cfg)),  # plain values
                   os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        names = map(re.compile(r"checkpoint-(\d+)").fullmatch, os.listdir(cfg.out_dir))
        steps = sorted(int(m[1]) for m in names if m and int(m[1]) <= step)  # as numbers, not names
        for old in steps[:-cfg.keep_checkpoints] if cfg.keep_checkpoints else []:
            shutil.rmtree(os.path.join(cfg.out_dir, f"checkpoint-{old}"))
    if distributed():
        dist.barrier()


def step_metrics(sums, rewards, penalty, gate, responses, truncated, cfg, device):
    """The step's diagnostics, summed over ranks before dividing (means over the global batch)."""
    groups = rewards.view(-1, cfg.group_size)                                         # (B, G)
    local = {k: sums.get(k, 0.0) for k in "tokens kl teacher_tokens ref_kl entropy clipped approx_kl "
             "rlsd_tokens rlsd_delta rlsd_weight rlsd_clipped".split()}  # RLSD's: over the tokens it scored
    local.update(reward=rewards.sum().item(), kl_penalty=penalty.sum().item(), samples=len(rewards),
                 flat_groups=(groups.amin(1) == groups.amax(1)).sum().item() * (cfg.group_size > 1),
                 gated=gate.sum().item(), truncated=sum(truncated))
    summed = all_reduce(torch.tensor(list(local.values()), dtype=torch.float64, device=device)).tolist()
    t = dict(zip(local, summed))  # by name: a key added anywhere cannot shift the others
    longest = all_reduce(torch.tensor(float(max(map(len, responses))), device=device), "MAX")
    steps = max(1.0, sums["steps"])  # loss, grad norm and update counts are the same on every rank
    return dict(reward=t["reward"] / t["samples"], gate_ratio=t["gated"] / t["samples"],
                correct_frac=(t["reward"] / t["samples"] + 1) / 2,  # the share of +1 rewards (the others -1)
                zero_spread_frac=t["flat_groups"] * cfg.group_size / t["samples"],  # G = 1: never flat, A = R
                opd_kl=t["kl"] / t["teacher_tokens"] if t["teacher_tokens"] else None,
                ref_kl=t["ref_kl"] / t["tokens"] if cfg.alpha > 0 else None,
                kl_penalty=t["kl_penalty"] / t["samples"] if cfg.kl_reward else None,
                rlsd_delta=t["rlsd_delta"] / t["rlsd_tokens"] if t["rlsd_tokens"] else None,
                rlsd_weight=t["rlsd_weight"] / t["rlsd_tokens"] if t["rlsd_tokens"] else None,
                rlsd_clip_frac=t["rlsd_clipped"] / t["rlsd_tokens"] if t["rlsd_tokens"] else None,
                clip_frac=t["clipped"] / t["tokens"], approx_kl=t["approx_kl"] / t["tokens"],
                entropy=t["entropy"] / t["tokens"], response_len=t["tokens"] / t["samples"],
                response_len_max=longest.item(), truncated_frac=t["truncated"] / t["samples"],
                loss=sums["loss"] / steps, grad_norm=sums["grad_norm"] / steps,
                skipped_updates=sums["skipped"], teacher_tokens=t["teacher_tokens"], tokens=t["tokens"],
                peak_gpu_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
                decode_compiles=COMPILES["decode_step"],  # this process's counts: they restart on resume
                cudagraph_skips=torch._dynamo.utils.counters["inductor"]["cudagraph_skips"])


def step_prompts(problems, step, cfg):
    """Step k's prompts (a seeded permutation per epoch: a resumed run continues exactly), by rank."""
    (rank, world), n = rank_and_world(), len(problems)
    positions = range((step - 1) * cfg.batch_size, step * cfg.batch_size)
    orders = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
              for epoch in {pos // n for pos in positions}}
    return [problems[orders[pos // n][pos % n]] for pos in positions][rank::world]


# --- Setup: flags, data and models, optimizer and resume ----------------------------------------------------
def check_flags(cfg, world):
    """Refuse, before any write: bad flags, installs below the floors, a used --out-dir, a missing tracker."""
    for package, need in ((torch, "2.10"), (__import__("transformers"), "4.56")):
        name, have = package.__name__, package.__version__
        if [int(x) for x in re.findall(r"\d+", have)[:2]] < [int(x) for x in need.split(".")]:
            raise UserError(f"{name} {have} is too old: sdpg.py needs {name} >= {need}")
    for f in dataclasses.fields(cfg):
        value, valid, flag = getattr(cfg, f.name), f.metadata, "--" + f.name.replace("_", "-")
        if "choices" in valid and value not in valid["choices"]:
            raise UserError(f"unknown {flag} {value!r}: use {', '.join(valid['choices'])}")
        bounds = {sign: valid[k] for k, sign in (("low", ">="), ("above", ">"), ("high", "<=")) if k in valid}
        low, above, high = bounds.get(">=", -math.inf), bounds.get(">", -math.inf), bounds.get("<=", math.inf)
        if bounds and not (low <= value <= high and value > above):
            raise UserError(f"{flag} {value}: must be {' and '.join(f'{s} {b}' for s, b in bounds.items())}")
    if cfg.keep_checkpoints == 1:
        raise UserError("--keep-checkpoints 1: use 0 (all) or at least 2 (a crash mid-save leaves one whole)")
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {world} ranks")
    if cfg.ppo_minibatches > cfg.batch_size // world * cfg.group_size:  # an empty one would still step
        raise UserError(f"--ppo-minibatches {cfg.ppo_minibatches} exceeds the --batch-size x --group-size "
                        f"samples per rank ({cfg.batch_size // world * cfg.group_size})")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available")
    if os.path.isfile(cfg.out_dir):
        raise UserError(f"--out-dir {cfg.out_dir!r} is a file")
    # rank 0 alone: it writes, and another rank checking later would find its files
    held = sorted(os.listdir(cfg.out_dir)) if os.path.isdir(cfg.out_dir) and rank_and_world()[0] == 0 else []
    if not cfg.resume and any(n == "metrics.jsonl" or n.startswith("checkpoint-") for n in held):
        raise UserError(f"--out-dir {cfg.out_dir!r} holds a run: continue it with --resume "
                        f"{os.path.join(cfg.out_dir, 'checkpoint-<step>')}, or name another --out-dir")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise UserError(f"--report-to {cfg.report_to}: not installed (pip install {cfg.report_to})")


def load_run(cfg):
    """(tokenizer, training problems, evaluation sets, pi_theta in fp32, pi_ref or None), before any write."""
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    device = f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu"  # torchrun: this rank's GPU
    if rank_and_world()[0] == 0:  # once; --device auto falling back to the CPU says so
        fallback = cfg.device == "auto" and not use_cuda
        print(f"device: {device}" + " (--device auto found no CUDA device)" * fallback)
    torch.manual_seed(cfg.seed + rank_and_world()[0])  # each rank samples its own responses
    model_path = resolve_model_name(cfg.model)
    tokenizer = load_pretrained("AutoTokenizer", model_path)
    if tokenizer.pad_token_id is None:  # pad with EOS; masks never depend on the pad id
        tokenizer.pad_token = tokenizer.eos_token
    train_set = build_prompts(tokenizer, load_problems(cfg.task, "train"), cfg.max_prompt_tokens,
                              cfg.beta > 0 or cfg.rlsd_lambda > 0, cfg.answer_format)
    eval_sets = {}
    for task in filter(None, (cfg.eval_task or cfg.task).split(",")):
        problems = build_prompts(tokenizer, load_problems(task, "test"), cfg.max_prompt_tokens, False,
                                 cfg.answer_format)
        if problems:
            eval_sets[os.path.splitext(os.path.basename(task))[0]] = problems[: cfg.eval_n or None]
    if not train_set:
        raise UserError(f"no usable training problems in {cfg.task!r}")
    model = load_pretrained("AutoModelForCausalLM", cfg.resume or model_path, dtype=torch.float32).to(device)
    check_plain_head(model)
    rows = model.get_input_embeddings().num_embeddings  # Qwen's has more rows than its tokenizer ids
    if not tokenizer("0", add_special_tokens=False)["input_ids"] or len(tokenizer) > rows:
        raise UserError(f"the tokenizer of {cfg.model!r} ({len(tokenizer)} ids) is empty or exceeds the "
                        f"model's {rows} embeddings")
    if cfg.grad_checkpointing:  # called activation checkpointing from transformers 5.24 on
        enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
        enable({"use_reentrant": False})
    # pi_ref, the initial policy also on resume: bf16 on CUDA, but for --kl-reward as pi_old (k1 starts at 0)
    ref_bf16 = (use_cuda and not cfg.kl_reward) if cfg.ref_dtype == "auto" else cfg.ref_dtype == "bf16"
    ref_dtype = torch.bfloat16 if ref_bf16 else torch.float32
    ref_model = (load_pretrained("AutoModelForCausalLM", model_path, dtype=ref_dtype).to(device)
                 if cfg.alpha > 0 or cfg.kl_reward else None)
    return tokenizer, train_set, eval_sets, model, ref_model


def optimizer_and_resume(cfg, model):
    """AdamW (under torchrun sharded: ZeRO-1) and its warmup; with --resume their state, step and RNGs."""
    params = [p for p in model.parameters() if p.requires_grad]
    # fused on one GPU (no foreach temporaries); not under ZeRO, which loads the step counts onto the CPU
    kwargs = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                  fused=True if params[0].is_cuda and not distributed() else None)
    if distributed():
        from torch.distributed.optim import ZeroRedundancyOptimizer
        optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kwargs)
    else:
        optimizer = torch.optim.AdamW(params, **kwargs)
    warmup = lambda s: min(1.0, (s + 1) / max(1, cfg.lr_warmup))  # linear, then constant
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    if not cfg.resume:
        return optimizer, scheduler, 1, 0
    # mapped to the CPU: AdamW's state moves to its parameters' device as it loads (not all to GPU 0 or RAM)
    state = torch.load(os.path.join(cfg.resume, "trainer_state.pt"), map_location="cpu", mmap=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][rank_and_world()[0]]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and model.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    return optimizer, scheduler, state["step"] + 1, state["bad_steps"]


def open_metrics(cfg, start):
    """(write a row, finish) of metrics.jsonl and --report-to on rank 0; a resumed run keeps earlier rows."""
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rank_and_world()[0] != 0:
        return (lambda row: None), (lambda: None)
    tracker = None if cfg.report_to == "none" else importlib.import_module(cfg.report_to)
    if tracker:  # first, as it may fail (an account); trackio and wandb share init, log and finish
        tracker.init(project="sdpg", name=cfg.run_name, config=dataclasses.asdict(cfg), resume="allow",
                     **(dict(id=cfg.run_name) if cfg.report_to == "wandb" else {}))  # wandb resumes by id
    os.makedirs(cfg.out_dir, exist_ok=True)
    earlier = []
    if cfg.resume and os.path.exists(path):
        with open(path) as f:
            earlier = [line for line in f if json.loads(line)["step"] < start]
    with open(path, "w") as f:
        f.writelines(earlier)

    def write(row):  # each row on disk, and the file closed, once written
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if tracker:
            tracker.log({k: v for k, v in row.items() if v is not None}, step=row["step"])
    return write, (tracker.finish if tracker else lambda: None)


# --- Training loop: Algorithm 1 -----------------------------------------------------------------------------
def train(cfg):
    rank, world = rank_and_world()
    check_flags(cfg, world)
    tokenizer, train_set, eval_sets, model, ref_model = load_run(cfg)
    sampler, stop_ids = sampling_policy(model), stop_token_ids(tokenizer, model)  # sampler: bf16 on CUDA
    pad_id, G, device = tokenizer.pad_token_id, cfg.group_size, model.device
    prompt_len = max(len(p["student_ids"]) for p in train_set)  # every training call: one prompt width
    graphed_decode_step.graphs = 1 + len(eval_sets)  # one decode shape for training, one an evaluation set
    optimizer, scheduler, start, bad_steps = optimizer_and_resume(cfg, model)
    stamp = f"{os.path.basename(os.path.abspath(cfg.out_dir))}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = dataclasses.replace(cfg, run_name=cfg.run_name or stamp)  # the tracker's run, also checkpointed
    log, finish_log = open_metrics(cfg, start)
    if start == 1 and eval_sets:  # the starting point: step 0
        log(dict(step=0, **evaluate(sampler, tokenizer, eval_sets, cfg, stop_ids)))
    beta_warmup = cfg.beta_warmup if cfg.beta_warmup >= 0 else cfg.total_steps / 8
    beta_decay = cfg.beta_decay if cfg.beta_decay >= 0 else cfg.total_steps * 7 / 8
    bar = tqdm(range(start, cfg.total_steps + 1), desc="sdpg", total=cfg.total_steps, initial=start - 1,
               disable=rank != 0)
    for step in bar:
        timings, t_step, lr = {}, time.perf_counter(), scheduler.get_last_lr()[0]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # 1. sample: G responses per prompt from pi_theta(.|x)                        (Alg. 1, l. 5)
        with timed(timings, "sample_s", device):
            group = [p for p in step_prompts(train_set, step, cfg) for _ in range(G)]
            prompts = [p["student_ids"] for p in group]                                      # x
            responses, truncated = generate(sampler, prompts, cfg, pad_id, stop_ids, prompt_len=prompt_len)
        # 2. verify: R_i = +1 if the final answer is right, else -1                  (l. 7)
        with timed(timings, "verify_s", device):
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            rewards = torch.tensor([reward(t, p["answer"], cfg.answer_format) for t, p in zip(texts, group)])
        # 3. no-grad per-token scores: pi_ref's; pi_old's where rho can differ from 1, --kl-reward or RLSD
        lambda_k = rlsd_lambda_schedule(step, cfg.rlsd_lambda, cfg.rlsd_decay)  # 0: RLSD off, or decayed
        with timed(timings, "ref_s", device):
            ref_logp = score_tokens(ref_model, prompts, responses, cfg, pad_id) if ref_model else None
            rollouts = Rollouts(prompts, [p["teacher_ids"] for p in group], responses, ref_logp=ref_logp)
            scored = cfg.ppo_minibatches > 1 or cfg.kl_reward or lambda_k > 0
            old_logp = score_tokens(model, prompts, responses, cfg, pad_id) if scored else None
            rollouts.old_logp = old_logp if cfg.ppo_minibatches > 1 else None  # one step: rho = 1
        # 4. on the CPU: A_i (Eq. 2.1) of R_i less any KL penalty (flat groups' A != 0, as verl), m_i, beta(k)
        penalty = (kl_in_reward(old_logp, rollouts.ref_logp, cfg.kl_reward) if cfg.kl_reward
                   else torch.zeros(len(rewards)))                                            # (S,)
        rollouts.advantages = group_advantages(rewards - penalty, G)                           # (S,)
        gate = positive_advantage_gate(rollouts.advantages) if cfg.gate else torch.ones(len(rewards))
        beta_k = beta_schedule(step, cfg.total_steps, cfg.beta, beta_warmup, beta_decay)
        rollouts.kl_weight = beta_k * gate                                                    # (S,)
        # RLSD (App. B): pi_old scores (c, x) where A_i != 0; their A_i become A_t, per token, on the CPU
        reweighted = rollouts.advantages.nonzero().view(-1).tolist() if lambda_k > 0 else []
        rlsd_sums = {}
        if reweighted:
            with timed(timings, "ref_s", device):
                teacher_logp = score_tokens(model, [rollouts.teacher_ids[i] for i in reweighted],
                                            [responses[i] for i in reweighted], cfg, pad_id)
            a_t, delta, weight = rlsd_advantages(                                             # (n,) each
                rollouts.per_token(rollouts.advantages, reweighted, device), torch.cat(teacher_logp),
                rollouts.per_token(old_logp, reweighted, device), lam=lambda_k, eps_w=cfg.rlsd_eps_w)
            by_sample = dict(zip(reweighted, a_t.cpu().split([len(responses[i]) for i in reweighted])))
            rollouts.advantages = [by_sample.get(i, a) for i, a in enumerate(rollouts.advantages)]
            w_clip = weight.clamp(1 - cfg.rlsd_eps_w, 1 + cfg.rlsd_eps_w)
            rlsd_sums = dict(rlsd_tokens=len(a_t), rlsd_delta=delta.sum().item(),
                             rlsd_weight=w_clip.sum().item(), rlsd_clipped=(w_clip != weight).sum().item())
        # 5. update: teacher forward on the gated samples, student forward, fused head, AdamW
        with timed(timings, "update_s", device):
            sums = update_policy(model, optimizer, rollouts, cfg, pad_id) | rlsd_sums
            scheduler.step()
            if sampler is not model:  # the bf16 sampling copy, refreshed in place
                sampler.load_state_dict(model.state_dict())
        timings.update(teacher_s=sums["teacher_s"], update_s=timings["update_s"] - sums["teacher_s"])
        bad_steps = bad_steps + 1 if sums["skipped"] else 0
        if bad_steps >= cfg.max_bad_steps:
            raise UserError(f"{bad_steps} updates in a row had a non-finite loss or gradient norm; "
                            f"stopping at step {step} (try a lower --lr)")
        # 6. log (metrics summed over ranks), evaluate, save
        row = dict(step=step, **step_metrics(sums, rewards, penalty, gate, responses, truncated, cfg, device),
                   beta=beta_k, rlsd_lambda=lambda_k if cfg.rlsd_lambda > 0 else None, lr=lr, **timings,
                   step_s=time.perf_counter() - t_step, accuracy=None)
        row["tokens_per_s"] = row.pop("tokens") / row["step_s"]
        if eval_sets and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.total_steps):
            with timed(row, "eval_s", device):
                row.update(evaluate(sampler, tokenizer, eval_sets, cfg, stop_ids))
        log(row)
        shown = {k: "-" if row[k] is None else f"{row[k]:.3g}" for k in ("reward", "opd_kl", "accuracy")}
        bar.set_postfix(shown)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.total_steps:
            save_checkpoint(cfg, step, model, tokenizer, optimizer, scheduler, bad_steps)
    finish_log()
    return model


def parse_args(argv=None):
    """Config: the flags given, over a resumed checkpoint's (the same unless free), over the defaults."""
    parser = argparse.ArgumentParser(description="SDPG: Self-Distilled Policy Gradient (arXiv 2606.04036)")

    def refuse(message):  # argparse's errors as one line, without its usage block
        raise UserError(message)
    parser.error = refuse
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for f in fields.values():  # SUPPRESS: only the flags given are set
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']} (default: {f.default})", **kind)
    given, recorded = vars(parser.parse_args(argv)), {}
    if given.get("resume"):
        state = os.path.join(given["resume"], "trainer_state.pt")
        if not os.path.isfile(state):
            raise UserError(f"--resume {given['resume']!r} is not a checkpoint directory")
        recorded = {k: v for k, v in torch.load(state, mmap=True).get("flags", {}).items() if k in fields}
        changed = [f"--{k.replace('_', '-')} {v!r} (the run's: {recorded[k]!r})" for k, v in given.items()
                   if k in recorded and v != recorded[k] and not fields[k].metadata.get("free")]
        if changed:
            raise UserError(f"a resumed run keeps its flags, but {', '.join(changed)} differ")
        recorded["out_dir"] = os.path.dirname(os.path.normpath(given["resume"]))  # the run's own folder
    return Config(**{**recorded, **given})


def main(argv=None):
    try:
        cfg = parse_args(argv)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
            cuda = torch.cuda.is_available() and cfg.device != "cpu"
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if cuda else "gloo")
        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if distributed():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
