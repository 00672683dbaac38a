"""Tests for sdpg.py (CPU, offline): `python -m pytest -q test_sdpg.py`.
Benchmarks and the README's evidence rows (not tests): `python test_sdpg.py --help`."""
import json
import math
import os
import shutil
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

import sdpg

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------
# A tiny Qwen2-architecture model and a character tokenizer with a chat template
# ------------------------------------------------------------------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(pad=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    prompts = ("".join(sum(sdpg.ANSWER_FORMATS.values(), ()))
               + sdpg.STUDENT_PROMPT + sdpg.HINT + sdpg.HINT_SOLUTION)
    chars = sorted(set(prompts + "0123456789+-*/=?.,$#{}\\ \n"
                       + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:[]()'"))
    # one token a character, in byte-level form (' ' is 'Ġ'): transformers >= 5 reloads a qwen2
    # checkpoint's tokenizer as Qwen2Tokenizer whatever tokenizer_class says, and that class rebuilds a
    # byte-level BPE from the vocabulary, so the ids and the whitespace stay the same on every release
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {"<unk>": 0, **{byte_level.pre_tokenize_str(c)[0][0]: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = byte_level, decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:])
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    fast.add_tokens([f"#### {d}" for d in range(10)])  # so that a 1-token response can be '#### 7'
    if pad:
        fast.pad_token = "<|endoftext|>"  # Qwen-style: pad == EOS
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model_dir(path, tie=True):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok) + 7,  # ids past len(tokenizer) exist, as in Qwen
                         hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=tie,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_problems(path, n=12, answer=7, context=True):
    rows = []
    for i in range(n):
        a, b = i % 5, answer - i % 5
        row = {"question": f"Tom has {a} pens and gets {b} more. How many pens?", "answer": str(answer)}
        if context and i % 2:
            row["context"] = f"{a}+{b}={answer}"
        rows.append(row)
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return dict(model=make_model_dir(root / "model"), data=write_problems(root / "problems.jsonl"), root=root)


def run_args(tiny, out, *extra):
    return ["--model", tiny["model"], "--task", tiny["data"], "--out-dir", str(out), "--device", "cpu",
            "--batch-size", "4", "--group-size", "4", "--max-response-tokens", "6", "--total-steps", "2",
            "--eval-n", "4", "--eval-every", "0", "--save-every", "0", "--lr", "1e-3", *extra]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------
# The equations
# ------------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, -1.0, -1.0, -1.0])
    mean = -0.5
    std = math.sqrt(((1 - mean) ** 2 + 3 * (-1 - mean) ** 2) / 3)  # unbiased: divide by G - 1
    want = (r - mean) / (std + 1e-6)
    assert torch.allclose(sdpg.group_advantages(r, 4), want, atol=1e-6)


def test_group_advantages_several_groups_equal_groups_and_g1():
    r = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0])  # groups of 3
    adv = sdpg.group_advantages(r, 3)
    assert torch.equal(adv[:3], torch.zeros(3)) and torch.equal(adv[3:6], torch.zeros(3))
    std = torch.tensor([1.0, -1.0, 1.0]).std()
    assert torch.allclose(adv[6:], (torch.tensor([1.0, -1.0, 1.0]) - 1 / 3) / (std + 1e-6), atol=1e-6)
    # a group of one: verl's mean 0 and std 1, so A_i = R_i (over 1 + 1e-6), never 0
    one = sdpg.group_advantages(torch.tensor([1.0, -1.0, -1.0]), 1)
    assert torch.equal(one, (torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64) / (1 + 1e-6)).float())
    assert sdpg.group_advantages(r, 3).shape == r.shape


def test_beta_schedule_edges():
    b = lambda k, T=400, w=50, d=350: sdpg.beta_schedule(k, T, 1e-3, w, d)
    assert b(0) == 0.0 and b(25) == pytest.approx(0.5e-3) and b(50) == pytest.approx(1e-3)
    assert b(51) == pytest.approx(349 / 350 * 1e-3) and b(400) == 0.0 and b(401) == 0.0
    assert b(225) == pytest.approx(1e-3 * 175 / 350)
    # overlapping windows: peak below beta
    assert max(b(k, T=100, w=60, d=60) for k in range(101)) < 1e-3
    assert b(30, T=100, w=60, d=60) == pytest.approx(1e-3 * 0.5)
    assert sdpg.beta_schedule(0, 10, 1e-3, 0, 0) == 1e-3 and sdpg.beta_schedule(10, 10, 1e-3, 0, 5) == 0.0


def rlsd_by_hand(a, teacher, old, lam, eps_w):
    """Appendix B for one token in float64, with the authors' clamps: (A_t, Delta_t, w_t)."""
    sign = (a > 0) - (a < 0)
    delta = min(20.0, max(-20.0, teacher - old))
    w = math.exp(min(20.0, max(-20.0, sign * delta)))
    return (1 - lam) * a + lam * a * min(1 + eps_w, max(1 - eps_w, w)), delta, w


def test_rlsd_advantages_by_hand():
    # A_i > 0 and A_i < 0, each with its weight clipped above, inside and clipped below; A_i = 0; Delta
    # past 20; verl's defaults lam 0.49 (step 1), eps_w 0.2
    a = [1.5, 1.5, 1.5, -0.7, -0.7, -0.7, 0.0, 0.0, 2.0]
    teacher = [-0.5, -1.0, -3.0, -3.0, -1.0, -0.5, -0.2, -5.0, -0.1]
    old = [-1.0, -1.05, -1.0, -1.0, -1.05, -1.0, -2.0, -1.0, -40.0]
    got = sdpg.rlsd_advantages(*(torch.tensor(x, dtype=torch.float64) for x in (a, teacher, old)), 0.49, 0.2)
    want = torch.tensor([rlsd_by_hand(*x, 0.49, 0.2) for x in zip(a, teacher, old)], dtype=torch.float64).T
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-14, atol=1e-14)
    a_t, delta, weight = got
    clipped_above, clipped_below = weight > 1.2, weight < 0.8
    assert clipped_above.tolist() == [True, False, False, True, False, False, False, False, True]
    assert clipped_below.tolist() == [False, False, True, False, False, True, False, False, False]
    assert a_t[6:8].eq(0).all() and weight[6:8].eq(1).all() and delta[8] == 20.0  # A_i = 0 stays 0
    assert a_t[0].item() == pytest.approx(1.5 * (0.51 + 0.49 * 1.2), rel=1e-14)
    assert a_t[5].item() == pytest.approx(-0.7 * (0.51 + 0.49 * 0.8), rel=1e-14)


@pytest.mark.parametrize("step,lam", [(1, 0.49), (25, 0.25), (49, 0.01), (50, 0.0), (80, 0.0)])
def test_rlsd_lambda_decays_to_zero_at_t_lambda(step, lam):
    assert sdpg.rlsd_lambda_schedule(step, 0.5, 50) == pytest.approx(lam, abs=1e-15)  # the authors' decay
    assert sdpg.rlsd_lambda_schedule(step, 0.5, 0) == 0.5  # T_lambda = 0: Appendix B's constant lambda
    tokens = [(1.5, -0.5, -1.0), (-0.7, -0.5, -1.0), (1.5, -1.02, -1.0)]  # (A_i, teacher, old) a token
    a, teacher, old = torch.tensor(tokens, dtype=torch.float64).T
    a_t, _, _ = sdpg.rlsd_advantages(a, teacher, old, sdpg.rlsd_lambda_schedule(step, 0.5, 50), 0.2)
    want = [rlsd_by_hand(*x, 0.5 * max(0.0, 1 - step / 50), 0.2)[0] for x in tokens]
    assert torch.allclose(a_t, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    if lam == 0:  # past T_lambda: A_t is A_i, bit for bit
        assert torch.equal(a_t, a)


@pytest.mark.parametrize("mode,value,grad", [
    ("urkl", lambda lw: 0.5 * lw ** 2, lambda lw: lw),
    ("ufkl", lambda lw: torch.exp(-lw) + lw - 1, lambda lw: 1 - torch.exp(-lw)),
])
def test_ref_kl_penalty_value_and_gradient(mode, value, grad):
    logp = torch.tensor([-0.5, -2.0, -0.1], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-0.7, -1.0, -0.1], dtype=torch.float64)
    f = sdpg.ref_kl_penalty(logp, ref, mode)
    lw = (logp - ref).detach()
    assert torch.allclose(f.detach(), value(lw))
    (g,) = torch.autograd.grad(f.sum(), logp)
    assert torch.allclose(g, grad(lw))
    assert sdpg.ref_kl_penalty(ref, ref, mode).abs().max() == 0  # pi = pi_ref: no penalty, ref_kl 0


def test_dual_clip_regimes():
    def loss_and_grad(ratio, adv):
        logp = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
        loss = sdpg.dual_clip_pg_loss(logp, torch.zeros(1, dtype=torch.float64),
                                      torch.tensor([adv], dtype=torch.float64), 0.2, 0.28, 10.0)
        (g,) = torch.autograd.grad(loss.sum(), logp)
        return loss.item(), g.item()
    # inside the clip: -A rho, gradient -A rho
    assert loss_and_grad(1.1, 2.0) == pytest.approx((-2.2, -2.2))
    # A > 0 above 1 + eps_high: clipped, no gradient
    assert loss_and_grad(1.5, 2.0) == pytest.approx((-2.0 * 1.28, 0.0))
    # A > 0 below 1 - eps_low: the unclipped term is larger, gradient flows
    assert loss_and_grad(0.5, 2.0) == pytest.approx((-1.0, -1.0))
    # A < 0 below 1 - eps_low: clipped, no gradient
    assert loss_and_grad(0.5, -1.0) == pytest.approx((0.8, 0.0))
    # A < 0 above 1 + eps_high but under c: -A rho with gradient
    assert loss_and_grad(3.0, -1.0) == pytest.approx((3.0, 3.0))
    # A < 0 past clip_c: capped at -A c, no gradient
    assert loss_and_grad(20.0, -1.0) == pytest.approx((10.0, 0.0))


def test_opd_logit_gradient_is_prop_3_1():
    torch.manual_seed(0)
    z = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    zq = torch.randn(5, 11, dtype=torch.float64)
    y = torch.randint(0, 11, (5,))
    logp, logq = (z / 0.8).log_softmax(-1), zq.log_softmax(-1)  # the teacher is not tempered
    kl_ref = (logp.exp() * (logp - logq)).sum(-1)
    coef = torch.rand(5, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad((coef * kl_ref).sum(), z, retain_graph=True)
    tok_logp, entropy, kl, lse_p, lse_q = sdpg.logit_stats(z.detach(), zq, y, 0.8)
    assert torch.allclose(kl, kl_ref.detach()) and torch.allclose(tok_logp, logp.detach()[range(5), y])
    assert torch.allclose(entropy, -(logp.exp() * logp).sum(-1).detach())
    no_token_term = torch.zeros(5, dtype=torch.float64)
    g = sdpg.logit_grad(z.detach(), zq, y, lse_p, lse_q, kl, coef, no_token_term, 0.8)
    assert torch.allclose(g / 0.8, g_ref)  # z / T: the chain rule's 1/T is the head's to apply
    # the advantage -g/p is centred under p (Prop. 3.1): each row of the gradient sums to 0
    assert torch.allclose(g.sum(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    # the sampled-token part: d log pi(y)/dz = onehot - p
    one = torch.ones(5, dtype=torch.float64)
    g_tok = sdpg.logit_grad(z.detach(), None, y, lse_p, lse_q, kl, coef, one, 0.8)
    (want,) = torch.autograd.grad(logp[range(5), y].sum(), z)
    assert torch.allclose(g_tok / 0.8, want)


# ------------------------------------------------------------------------------------------
# The fused head against a naive float64 reference
# ------------------------------------------------------------------------------------------
def naive_loss(hs, ht, w, tokens, adv, kl_w, old, ref, n_tokens, alpha=1e-3, temperature=1.0,
               eps_low=0.2, eps_high=0.28, clip_c=10.0):
    """Eq. A.3 written out with full (N x V) logits and autograd, urkl reference term."""
    logp_all = (hs @ w.T / temperature).log_softmax(-1)
    logq_all = (ht @ w.T).log_softmax(-1).detach()  # the temperature divides the student's logits only
    kl = (logp_all.exp() * (logp_all - logq_all)).sum(-1).clamp(max=20.0)  # the authors' cap
    logp = logp_all.gather(1, tokens[:, None]).squeeze(1)
    old = logp.detach() if old is None else old
    rho = torch.exp(logp - old)
    pg = torch.maximum(-adv * rho, -adv * rho.clamp(1 - eps_low, 1 + eps_high))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * clip_c), pg)
    ref_term = alpha * rho.detach() * 0.5 * (logp - ref) ** 2
    return (pg + ref_term + kl_w * rho.detach() * kl).sum() / n_tokens


def head_inputs(n=13, h=8, v=29, dtype=torch.float64, seed=0, old=True):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=dtype)
    ht = hs + 0.5 * torch.randn(n, h, generator=g, dtype=dtype)
    w = torch.randn(v, h, generator=g, dtype=dtype) * 0.7
    tokens = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    kl_w = (torch.rand(n, generator=g) > 0.3).to(dtype) * 0.5
    with torch.no_grad():
        lp = (hs.double() @ w.double().T).log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    old_logp = (lp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)) if old else None
    ref_logp = lp - 0.2 * torch.rand(n, generator=g, dtype=torch.float64)
    return hs, ht, w, tokens, adv, kl_w, old_logp, ref_logp


def fused_and_naive(hs, ht, w, tokens, adv, kl_w, old, ref, chunk, temperature=1.0, tied_embed=None):
    n = len(tokens) + 3.0  # the normaliser need not be this batch's count (global token-mean)
    a_h, a_w = hs.clone().requires_grad_(), w.clone().requires_grad_()
    loss, stats = sdpg.sdpg_head_loss(a_h, ht, a_w, tokens, adv, kl_w, old, ref, n, alpha=0.3,
                                      temperature=temperature, chunk_size=chunk)
    loss.backward()
    b_h, b_w = hs.double().clone().requires_grad_(), w.double().clone().requires_grad_()
    want = naive_loss(b_h, ht.double(), b_w, tokens, adv.double(), kl_w.double(), old, ref, n,
                      alpha=0.3, temperature=temperature)
    want.backward()
    return (loss, a_h.grad, a_w.grad, stats), (want, b_h.grad, b_w.grad)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
@pytest.mark.parametrize("on_policy", [True, False])
def test_fused_head_matches_float64_reference(chunk, on_policy):
    inputs = head_inputs(old=not on_policy)
    (loss, gh, gw, stats), (want, wh, ww) = fused_and_naive(*inputs, chunk=chunk, temperature=0.7)
    assert rel(loss, want) < 1e-6 and rel(gh, wh) < 1e-6 and rel(gw, ww) < 1e-6
    hs, ht, w = inputs[:3]
    lp = (hs @ w.T / 0.7).log_softmax(-1)
    assert torch.allclose(stats[0], lp.gather(1, inputs[3][:, None]).squeeze(1))
    assert torch.allclose(stats[2], -(lp.exp() * lp).sum(-1))


def test_fused_head_n1_and_teacher_equal_student():
    hs, ht, w, tokens, adv, kl_w, old, ref = head_inputs(n=1)
    (loss, gh, gw, _), (want, wh, ww) = fused_and_naive(hs, ht, w, tokens, adv, kl_w + 1, old, ref, chunk=4)
    assert rel(loss, want) < 1e-6 and rel(gh, wh) < 1e-6 and rel(gw, ww) < 1e-6
    # teacher = student: KL = 0 and the distillation weight changes nothing
    hs, ht, w, tokens, adv, kl_w, old, ref = head_inputs()
    outs = []
    for weight in (torch.zeros_like(kl_w), torch.full_like(kl_w, 5.0)):
        h = hs.clone().requires_grad_()
        loss, stats = sdpg.sdpg_head_loss(h, hs, w, tokens, adv, weight, old, ref, 13.0, chunk_size=4)
        loss.backward()
        outs.append((loss.detach(), h.grad, stats[1]))
    assert outs[1][2].abs().max() < 1e-12
    assert torch.allclose(outs[0][0], outs[1][0]) and torch.allclose(outs[0][1], outs[1][1], atol=1e-12)


def test_a_kl_above_the_cap_adds_beta_times_the_cap_and_no_gradient():
    V, f64 = 16, torch.float64
    torch.manual_seed(0)
    student = torch.randn(2, V, dtype=f64, requires_grad=True)  # with an identity head: the logits
    teacher = torch.zeros(2, V, dtype=f64)
    teacher[0, : V // 2] = -200.0  # q ~ 0 where p has some of its mass: KL_t far above the cap
    teacher[1, 0] = 1.0           # KL_t well below the cap
    loss, stats = sdpg.sdpg_head_loss(student, teacher, torch.eye(V, dtype=f64), torch.tensor([0, 1]),
                                      torch.zeros(2, dtype=f64), torch.full((2,), 0.5, dtype=f64), None, None,
                                      2.0, alpha=0.0)  # A = 0 and no reference term: the KL term alone
    kl = stats[1]
    assert kl[0] > sdpg.KL_CAP > kl[1] > 0
    assert loss.item() == pytest.approx(0.5 * (sdpg.KL_CAP + kl[1].item()) / 2, rel=1e-12)
    loss.backward()
    assert torch.all(student.grad[0] == 0) and student.grad[1].abs().sum() > 0


def test_gate_zero_removes_kl_term():
    hs, ht, w, tokens, adv, kl_w, old, ref = head_inputs()
    kw = dict(chunk_size=4, alpha=0.0)
    a = hs.clone().requires_grad_()
    la, _ = sdpg.sdpg_head_loss(a, ht, w, tokens, adv, torch.zeros_like(kl_w), old, ref, 13.0, **kw)
    la.backward()
    b = hs.clone().requires_grad_()
    lb, _ = sdpg.sdpg_head_loss(b, None, w, tokens, adv, kl_w, old, ref, 13.0, **kw)  # no teacher at all
    lb.backward()
    c = hs.clone().requires_grad_()
    lc, _ = sdpg.sdpg_head_loss(c, ht, w, tokens, adv, kl_w, old, ref, 13.0, **kw)
    lc.backward()
    assert torch.equal(la, lb) and torch.allclose(a.grad, b.grad)
    assert not torch.allclose(a.grad, c.grad)  # an open gate does change the gradient
    # the teacher's states of the first 6 rows only (weight 0 past them; a chunk crosses row 6)
    prefix = torch.where(torch.arange(13) < 6, kl_w, 0.0)
    grads = []
    for teacher in (ht[:6], ht):
        d = hs.clone().requires_grad_()
        loss, _ = sdpg.sdpg_head_loss(d, teacher, w, tokens, adv, prefix, old, ref, 13.0, **kw)
        loss.backward()
        grads.append((loss, d.grad))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])
    assert not torch.allclose(grads[0][1], a.grad)  # the first rows are distilled


def test_fused_head_untied_and_tied_weights_reach_the_parameter():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    for tie in (True, False):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=1, tie_word_embeddings=tie)).double()
        ids = torch.randint(0, 40, (2, 9))
        tokens = ids[:, 1:].reshape(-1)
        adv, kl_w = torch.randn(16, dtype=torch.float64), torch.full((16,), 0.5, dtype=torch.float64)
        ref = torch.randn(16, dtype=torch.float64) - 3
        grads = []
        for fused in (True, False):
            model.zero_grad()
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 16)
            with torch.no_grad():
                teacher = model.model(input_ids=ids.flip(1)).last_hidden_state[:, :-1].reshape(-1, 16)
            w = model.get_output_embeddings().weight
            if fused:
                loss, _ = sdpg.sdpg_head_loss(hidden, teacher, w, tokens, adv, kl_w, None, ref, 16.0,
                                              alpha=0.5, chunk_size=5)
            else:
                loss = naive_loss(hidden, teacher, w, tokens, adv, kl_w, None, ref, 16.0, alpha=0.5)
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert model.get_input_embeddings().weight.grad.abs().sum() > 0
        for a, b in zip(*grads):
            assert rel(a, b) < 1e-6


def test_fused_head_bf16_within_tolerance():
    hs, ht, w, tokens, adv, kl_w, old, ref = head_inputs(n=40, h=32, v=300)
    hs, ht, w = (t.to(torch.bfloat16) for t in (hs, ht, w))
    (loss, gh, gw, _), (want, wh, ww) = fused_and_naive(hs, ht, w, tokens, adv, kl_w, old, ref, chunk=7)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # bf16 GEMMs, fp32 logits and an fp32 weight-gradient sum, against float64 on the same inputs
    assert rel(loss, want) < 1e-2 and rel(gh, wh) < 2e-2 and rel(gw, ww) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the compiled path)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_head_on_cuda_matches_float64(dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    hs, ht, w, tokens, adv, kl_w, old, ref = (t.cuda() for t in head_inputs(n=40, h=32, v=300))
    hs, ht, w = (t.to(dtype) for t in (hs, ht, w))
    (loss, gh, gw, _), (want, wh, ww) = fused_and_naive(hs, ht, w, tokens, adv, kl_w, old, ref, chunk=16,
                                                        temperature=0.7)
    assert rel(loss, want) < tol and rel(gh, wh) < tol and rel(gw, ww) < tol
    # the logits of a bf16 GEMM come out in fp32, not rounded to bf16 (8 bits) first
    logits, exact = sdpg.fp32_logits(hs, w), hs.double() @ w.double().T
    assert logits.dtype == torch.promote_types(dtype, torch.float32) and rel(logits, exact) < 1e-5


def test_head_never_allocates_tokens_by_vocab():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    n, h, v, chunk = 96, 4, 200, 8  # (N x H) and (V x H) tensors stay below chunk x V
    hs, ht, w, tokens, adv, kl_w, old, ref = head_inputs(n=n, h=h, v=v, dtype=torch.float32)
    hs.requires_grad_(), w.requires_grad_()
    with LargestOutput() as fused:
        loss, _ = sdpg.sdpg_head_loss(hs, ht, w, tokens, adv, kl_w, old, ref, float(n), chunk_size=chunk)
        loss.backward()
    with LargestOutput() as naive:
        naive_loss(hs, ht, w, tokens, adv, kl_w, old, ref, float(n)).backward()
    assert naive.largest >= n * v  # the recorder sees a (tokens x vocab) tensor when there is one
    assert fused.largest <= chunk * v  # the fused head never does


def test_microbatch_invariance():
    hs, ht, w, tokens, adv, kl_w, old, ref = head_inputs(n=20)
    whole_h, whole_w = hs.clone().requires_grad_(), w.clone().requires_grad_()
    sdpg.sdpg_head_loss(whole_h, ht, whole_w, tokens, adv, kl_w, old, ref, 20.0, chunk_size=6)[0].backward()
    part_h, part_w = hs.clone().requires_grad_(), w.clone().requires_grad_()
    for s, e in [(0, 3), (3, 11), (11, 20)]:
        sdpg.sdpg_head_loss(part_h[s:e], ht[s:e], part_w, tokens[s:e], adv[s:e], kl_w[s:e], old[s:e],
                            ref[s:e], 20.0, chunk_size=4)[0].backward()
    assert rel(part_h.grad, whole_h.grad) < 1e-12 and rel(part_w.grad, whole_w.grad) < 1e-12


def test_head_chunks_are_sized_for_the_path_that_runs(monkeypatch):
    """Eager until the compiled kernels have run (32 bytes a row and vocabulary entry), compiled
    after (10 bytes), eager again after a failed compile: the eager fallback stays in budget."""
    rows = lambda: [e - s for s, e in sdpg.head_chunks(10**5, 151936, 1024)][0]
    assert rows() == 2**30 // (151936 * 32)  # nothing compiled has run (the CPU never compiles)

    def broken(gm, example_inputs):
        raise RuntimeError("no Triton here")
    names = ("logit_stats", "logit_grad")
    for name in names:
        fn = sdpg.cuda_compiled(getattr(sdpg, name), devices=("cpu",), backend="eager", dynamic=True)
        monkeypatch.setattr(sdpg, "fused_" + name, fn)
    hs, ht, w, tokens, adv, kl_w, old, ref = head_inputs(dtype=torch.float32)
    sdpg.sdpg_head_loss(hs, ht, w, tokens, adv, kl_w, old, ref, 13.0, chunk_size=5)
    assert rows() == 2**30 // (151936 * 10)  # both compiled kernels have run
    for name in names:  # the same functions, whose next compile fails
        getattr(sdpg, "fused_" + name).compiled = torch.compile(getattr(sdpg, name), backend=broken)
    sdpg.sdpg_head_loss(hs, ht, w, tokens, adv, kl_w, old, ref, 13.0, chunk_size=5)
    assert rows() == 2**30 // (151936 * 32)
    assert [e - s for s, e in sdpg.head_chunks(13, 29, 1, chunk_size=5)] == [5, 5, 3]
    assert [e - s for s, e in sdpg.head_chunks(2, 10**9, 1)] == [1, 1]


# ------------------------------------------------------------------------------------------
# The sampler: our decode loop against model.generate
# ------------------------------------------------------------------------------------------
def tiny_model(kind="qwen2", tie=True, dtype=torch.float64):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    Config, Model = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    torch.manual_seed(1)
    tok = make_tokenizer()
    config = Config(vocab_size=len(tok) + 7, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                    initializer_range=0.2, tie_word_embeddings=tie,  # layers that outweigh the embedding
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return Model(config).to(dtype).eval(), tok


def hf_greedy(model, prompts, stop_ids, pad_id, n):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         eos_token_id=stop_ids, pad_token_id=pad_id)
    return [sdpg.cut_at_stop(row, stop_ids)[0] for row in out[:, width:].tolist()]


@pytest.mark.parametrize("kind,tie,attention", [("qwen2", True, "sdpa"), ("qwen2", False, "sdpg_decode"),
                                                ("qwen3", True, "sdpg_decode"), ("qwen3", False, "sdpa")])
def test_greedy_decode_loop_equals_model_generate(kind, tie, attention):
    model, tok = tiny_model(kind, tie)
    questions = ["Tom has 3 pens.", "How many pens does Tom have now, after he gets 4 more?", "Go", "2+2?"]
    prompts = [sdpg.chat_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    assert len(set(map(len, prompts))) == 4  # left padding of different widths
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert all(im_end in p for p in prompts)  # a stop token inside every prompt
    n = 12
    free = hf_greedy(model, prompts, [eos], eos, n)
    # a token that rows reach at different steps becomes a stop token too
    firsts = {t: {row.index(t) for row in free if t in row} for row in free for t in row}
    extra = max(firsts, key=lambda t: len(firsts[t]))
    stops = sorted({eos, im_end, extra})
    want = hf_greedy(model, prompts, stops, eos, n)
    assert len({len(r) for r in want}) > 1  # rows stop at different steps
    if attention == "sdpg_decode":
        sdpg.use_decode_attention(model)
    got, truncated = sdpg.generate(model, prompts, sdpg.Config(max_response_tokens=n), eos, stops,
                                   greedy=True)
    assert got == want and truncated == [r[-1] not in stops for r in want]
    # rows split by the memory budget give the same tokens
    split, _ = sdpg.generate(model, prompts, sdpg.Config(max_response_tokens=n, sample_memory_mb=0), eos,
                             stops, greedy=True)
    assert split == want


def family_model(family, vocab_size=64):
    """A random model of the family: 2 layers, 4 query heads of 8 sharing 2 K/V heads, fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=8)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "mistral"])  # sampling_policy's families
def test_decode_attention_serves_every_decode_step_and_none_of_the_prefill(family, monkeypatch):
    from transformers.integrations import sdpa_attention
    model, layers = family_model(family), 2
    query_lengths, prefill_calls = [], []
    real_attention, real_sdpa = sdpg.decode_attention, sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpg, "decode_attention", lambda module, query, *a, **k:
                        query_lengths.append(query.shape[2]) or real_attention(module, query, *a, **k))
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda module, query, *a, **k:
                        prefill_calls.append(query.shape[2]) or real_sdpa(module, query, *a, **k))
    sdpg.use_decode_attention(model)
    n = 8
    sdpg.generate(model, [[1, 2, 3], [4, 5]], sdpg.Config(max_response_tokens=n), 0, [10**6], greedy=True)
    assert query_lengths == [3] * layers + [1] * layers * (n - 1)  # the prefill, then every decode step
    assert prefill_calls == [3] * layers  # of which transformers' SDPA serves the prefill alone


def test_sampler_peak_is_within_its_budget_a_row():
    """Bytes of the tensors alive that decode_rows made (the K/V cache, the prefill, each decode step),
    tracked by storage: at most the budget's own figure a row, and at least the cache plus the sampling
    step's 16 bytes a row and vocabulary entry in fp32 (the logits, and three fp32 temporaries)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveBytes(TorchDispatchMode):
        storages, peak = {}, 0  # storage -> (weak reference, bytes)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {StorageWeakRef(t.untyped_storage()).cdata
                      for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            self.storages = {key: (ref, n) for key, (ref, n) in self.storages.items() if not ref.expired()}
            for t in [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]:
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in inputs:  # views and in-place ops make no storage
                    self.storages.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes()))
            self.peak = max(self.peak, sum(n for _, n in self.storages.values()))
            return out

    model = family_model("qwen2", vocab_size=4096)  # the budget's terms outweigh the prefill's activations
    prompts, cfg = [[1, 2, 3], [4, 5], [6, 7, 8, 9]], sdpg.Config(max_response_tokens=40)
    with LiveBytes() as live:
        sdpg.decode_rows(model, prompts, 3, cfg, 0, [10**6], False, 4)
    cache = 3 * 2 * 2 * (2 * 8) * decode_slots(4, cfg) * 4  # rows, layers, K and V, 2 heads of 8, slots, fp32
    assert live.peak <= 3 * sdpg.sampler_row_bytes(model, 4 + 40 + 16)
    # 16 bytes a vocabulary entry, not 20: the prefill's fp32 logits are gone before the decode steps
    assert cache + 3 * 16 * 4096 <= live.peak < cache + 3 * 20 * 4096


def test_a_forward_without_a_static_cache_is_one_error():
    model, tok = tiny_model("qwen2", False)
    prompt = sdpg.chat_prompt(tok, [{"role": "user", "content": "Go"}])
    model.forward = lambda input_ids, attention_mask, position_ids, cache_position, logits_to_keep: None
    with pytest.raises(sdpg.UserError, match="cannot sample from model type 'qwen2' with a static KV cache"):
        sdpg.generate(model, [prompt], sdpg.Config(max_response_tokens=4), 0, [0])


def total_variation_bound(p, n):
    """E[TV(empirical, p)] <= 1/2 sum_a sqrt(p_a (1 - p_a) / n) (Jensen); we allow 3x that."""
    return 1.5 * (p * (1 - p) / n).sqrt().sum().item()


def test_exponential_race_samples_the_tempered_softmax():
    torch.manual_seed(0)
    logits = torch.randn(40) * 2.0
    n, temperature = 20000, 0.7
    draws = sdpg.sample_token(logits.expand(n, 40), temperature)                    # (n,)
    freq = torch.bincount(draws, minlength=40).double() / n
    p = torch.softmax(logits.double() / temperature, -1)
    tv = lambda q: 0.5 * (freq - q).abs().sum().item()
    assert tv(p) < total_variation_bound(p, n)
    assert tv(torch.softmax(logits.double(), -1)) > total_variation_bound(p, n)  # T = 1 is told apart


def test_first_sampled_token_follows_the_model_softmax():
    model, tok = tiny_model("qwen2", True, torch.float32)
    prompt = sdpg.chat_prompt(tok, [{"role": "user", "content": "Count to three."}])
    n, temperature = 4000, 1.3
    torch.manual_seed(0)
    out, _ = sdpg.generate(model, [prompt] * n, sdpg.Config(max_response_tokens=1, temperature=temperature),
                           tok.eos_token_id, [tok.eos_token_id])
    freq = torch.bincount(torch.tensor([r[0] for r in out]), minlength=model.config.vocab_size).double() / n
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
    assert 0.5 * (freq - p).abs().sum().item() < total_variation_bound(p, n)


def test_teacher_runs_only_on_gated_samples(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    rollouts = injected_rollouts(tiny["model"])  # gates: samples 0, 2 and 7 (A > 0)
    teacher_prompts = set(map(tuple, rollouts.teacher_ids))
    rows = []
    real_hidden = sdpg.response_hidden
    monkeypatch.setattr(sdpg, "response_hidden", lambda m, p, r, *a: rows.extend(
        [len(x) for x, y in zip(r, p) if tuple(y) in teacher_prompts]) or real_hidden(m, p, r, *a))
    cfg = sdpg.Config(ppo_minibatches=1, micro_batch_tokens=10**6)
    sums = sdpg.update_policy(model, torch.optim.SGD(model.parameters(), lr=0.0), rollouts, cfg, 0)
    gated = [len(rollouts.response_ids[i]) for i in (0, 2, 7)]
    assert sorted(rows) == sorted(gated) and sums["teacher_tokens"] == sum(gated)
    assert model.training  # left so by the update; pi_old is scored in eval mode (no dropout)
    sdpg.score_tokens(model, rollouts.student_ids, rollouts.response_ids, cfg, 0)
    assert not model.training


def test_phase_timings_synchronise_on_cuda_only(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(a))
    timings = {}
    for device in ("cpu", "cuda", torch.device("cuda:0")):
        with sdpg.timed(timings, "phase", device):
            pass
    assert len(syncs) == 4 and timings["phase"] >= 0  # before and after each CUDA phase, none on the CPU


THREE_QUESTIONS = ("Tom has 3 pens.", "Go", "2+2?")


def check_compiled_decode(model, tok, compiled, monkeypatch, n=4000, temperature=1.3):
    """The compiled decode step against the eager one. Greedy: the same tokens up to the first
    near-tie (compiled kernels round differently). Sampled: by distribution, never by equality
    (inductor draws its random numbers from its own stream): the token the compiled step draws
    after the commonest first token follows the model's tempered softmax."""
    prompts = [sdpg.chat_prompt(tok, [{"role": "user", "content": q}]) for q in THREE_QUESTIONS]
    eos, width = tok.eos_token_id, max(map(len, prompts))
    cfg = sdpg.Config(max_response_tokens=24)
    monkeypatch.setattr(sdpg, "graphed_decode_step", sdpg.decode_step)
    eager = sdpg.decode_rows(model, prompts, 3, cfg, eos, [eos], True, width)
    monkeypatch.setattr(sdpg, "graphed_decode_step", compiled)
    graphed = sdpg.decode_rows(model, prompts, 3, cfg, eos, [eos], True, width)
    logits = lambda ids: model(torch.tensor([ids], device=model.device)).logits[0, -1].double()  # (V,)
    with torch.no_grad():
        for prompt, row, want in zip(prompts, graphed, eager):
            j = next((j for j, (a, b) in enumerate(zip(row, want)) if a != b), None)
            if j is not None:  # allowed only after a near-tie
                top = logits(prompt + want[:j]).topk(2).values
                assert (top[0] - top[1]).item() < 0.1, (j, top)
        cfg = sdpg.Config(max_response_tokens=2, temperature=temperature)
        out = sdpg.decode_rows(model, [prompts[0]] * n, n, cfg, eos, [eos], False, len(prompts[0]))
        out = torch.tensor(out)                                                       # (n, 2)
        first = torch.bincount(out[:, 0], minlength=model.config.vocab_size)
        first[eos] = 0
        second = out[out[:, 0] == first.argmax(), 1]                                  # (m,)
        freq = torch.bincount(second, minlength=model.config.vocab_size).double() / len(second)
        p = torch.softmax(logits(prompts[0] + [first.argmax().item()]) / temperature, -1)
    assert 0.5 * (freq.to(p.device) - p).abs().sum().item() < total_variation_bound(p, len(second))


def test_compiled_decode_step_by_distribution_on_cpu(monkeypatch):
    model, tok = tiny_model("qwen2", True, torch.float32)
    compiled = sdpg.cuda_compiled(sdpg.decode_step, devices=("cpu",), backend="aot_eager", dynamic=False)
    check_compiled_decode(model, tok, compiled, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the graph path)")
def test_cuda_graph_decode_and_bf16_greedy_matches_hf(monkeypatch):
    model, tok = tiny_model("qwen2", True, torch.float32)
    model = sdpg.sampling_policy(model.cuda())  # bf16 copy with the grouped-query decode attention
    check_compiled_decode(model, tok, sdpg.graphed_decode_step, monkeypatch, n=20000)
    prompts = [sdpg.chat_prompt(tok, [{"role": "user", "content": q}]) for q in THREE_QUESTIONS]
    eos = tok.eos_token_id
    ours = sdpg.decode_rows(model, prompts, 3, sdpg.Config(max_response_tokens=40), eos, [eos], True,
                            max(map(len, prompts)))
    model.config._attn_implementation = "sdpa"
    for prompt, row, want in zip(prompts, ours, hf_greedy(model, prompts, [eos], eos, 40)):
        if row[:len(want)] != want:  # allowed only after a near-tie in bf16
            j = next(j for j, (a, b) in enumerate(zip(row, want)) if a != b)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + want[:j]], device="cuda")).logits[0, -1]
                top = logits.float().topk(2).values
            assert (top[0] - top[1]).item() < 0.1, (j, top)


def counting_decode(monkeypatch):
    """The decode step compiled on the CPU by a backend that counts its graphs (and runs them
    eagerly); sdpg's own count starts from zero. Returns the graphs, and the (rows, slots, greedy) of
    each decode_rows call: its decode step's shape and mode."""
    graphs, shapes = [], []
    torch._dynamo.reset()  # earlier tests' decode graphs (other models) would count towards dynamo's limit
    backend = lambda gm, example_inputs: graphs.append(gm) or gm.forward
    compiled = sdpg.cuda_compiled(sdpg.decode_step, devices=("cpu",), backend=backend, dynamic=False)
    monkeypatch.setattr(sdpg, "graphed_decode_step", compiled)
    monkeypatch.setattr(sdpg, "COMPILES", sdpg.collections.Counter())
    real_decode_rows = sdpg.decode_rows

    def decode_rows(model, prompts, live, cfg, pad_id, stop_ids, greedy, prompt_len):
        shapes.append((len(prompts), decode_slots(prompt_len, cfg), greedy))
        return real_decode_rows(model, prompts, live, cfg, pad_id, stop_ids, greedy, prompt_len)
    monkeypatch.setattr(sdpg, "decode_rows", decode_rows)
    return graphs, shapes


def decode_slots(prompt_len, cfg):
    """The static cache's slots: prompt and response, rounded up to 16 (as in decode_rows)."""
    return -(-(prompt_len + cfg.max_response_tokens) // 16) * 16


def expected_shape(model, cfg, prompts, rows, greedy):
    """(rows, slots, greedy) of generate's calls for a set: as many of its rows as the budget holds."""
    width = max(map(len, prompts))
    row_bytes = sdpg.sampler_row_bytes(model, width + cfg.max_response_tokens + 16)
    return min(int(cfg.sample_memory_mb * 2**20) // row_bytes, rows), decode_slots(width, cfg), greedy


def test_decode_compiles_once_per_set_and_mode(tiny, tmp_path, monkeypatch):
    import dataclasses
    graphs, shapes = counting_decode(monkeypatch)
    # 3 steps of 16 rows over prompts of different lengths, split by a budget of about 9 rows,
    # greedy evaluation at steps 0, 2 and 3
    cfg = sdpg.parse_args(run_args(tiny, tmp_path, "--total-steps", "3", "--sample-memory-mb", "1.2",
                                   "--eval-every", "2"))
    model = sdpg.train(cfg)
    (rows, _), = model.sdpg_kv_caches  # the training cache alone is held; evaluation's was released
    assert rows < 16 and 16 % rows  # the rows were split, and the last call filled up
    tok = make_tokenizer()
    prompts = lambda split: [p["student_ids"] for p in
                             sdpg.build_prompts(tok, sdpg.load_problems(tiny["data"], split), 4096, False)]
    train_prompts, eval_prompts = prompts("train"), prompts("test")[:4]
    # training: its widest prompt, 16 rows a step, sampled; evaluation: its own width, 4 rows, greedy.
    # Where two shapes coincide (on some transformers releases) they share one graph
    expected = {expected_shape(model, cfg, train_prompts, 16, False),
                expected_shape(model, cfg, eval_prompts, 4, True)}
    assert set(shapes) == expected and len(graphs) == sdpg.COMPILES["decode_step"] == len(expected)
    assert [r["decode_compiles"] for r in read_metrics(tmp_path)[1:]] == [len(expected)] * 3
    problems = sdpg.build_prompts(tok, sdpg.load_problems(tiny["data"], "test"), 4096, False)[:4]
    mean_at_2 = dataclasses.replace(cfg, eval_samples=2)
    for _ in range(2):  # mean@k samples: evaluation's width, 8 rows, sampled: compiled once
        sdpg.evaluate(model, tok, {"set": problems}, mean_at_2, [tok.eos_token_id])
    expected.add(expected_shape(model, cfg, eval_prompts, 8, False))
    assert set(shapes) == expected and len(graphs) == sdpg.COMPILES["decode_step"] == len(expected)


def test_more_sets_than_dynamos_recompile_limit_compile_once_each(tiny, tmp_path, monkeypatch, capsys):
    graphs, shapes = counting_decode(monkeypatch)
    # nine evaluation sets, each a prompt 16 characters wider than the last: with training, 10 shapes
    sets = [write_json(tmp_path / f"set{k}.jsonl", [dict(question="Go" + "." * 16 * k, answer="7")])
            for k in range(9)]
    cfg = sdpg.parse_args(run_args(tiny, tmp_path, "--eval-task", ",".join(sets), "--total-steps", "1"))
    model = sdpg.train(cfg)
    assert len(set(shapes)) == len(graphs) == sdpg.COMPILES["decode_step"] == 10 > 8
    assert torch._dynamo.config.recompile_limit == 8  # torch's own setting, outside sdpg's calls
    assert "notice:" not in capsys.readouterr().err
    # a shape past the run's sets: one notice, and the decode step runs eagerly from then on
    prompt = make_tokenizer()("Go", add_special_tokens=False)["input_ids"]
    for width in (300, 400):
        sdpg.generate(model, [prompt], cfg, 0, [0], greedy=True, prompt_len=width)
    assert capsys.readouterr().err.count("notice: decode_step runs eagerly") == 1 and len(graphs) == 10


def test_a_failed_compile_is_one_notice_then_eager(capsys):
    def broken(gm, example_inputs):
        raise RuntimeError("no Triton here")

    def add_one(x):
        return x + 1
    compiled = sdpg.cuda_compiled(add_one, devices=("cpu",), backend=broken)
    assert [compiled(torch.ones(2)).tolist() for _ in range(3)] == [[2.0, 2.0]] * 3
    err = capsys.readouterr().err
    assert err.count("notice: add_one runs eagerly") == 1 and "no Triton here" in err


def test_reused_cache_keeps_its_storage_and_gives_fresh_cache_tokens():
    model, tok = tiny_model("qwen2", True, torch.float32)
    prompts = [sdpg.chat_prompt(tok, [{"role": "user", "content": q}]) for q in THREE_QUESTIONS]
    cfg, eos = sdpg.Config(max_response_tokens=16), tok.eos_token_id
    for greedy in (True, False):
        runs, storage = [], []
        for fresh in (False, False, True):
            if fresh:
                model.sdpg_kv_caches.clear()
            torch.manual_seed(0)
            runs.append(sdpg.generate(model, prompts, cfg, eos, [eos], greedy=greedy, prompt_len=40))
            (cache,) = model.sdpg_kv_caches.values()
            storage.append((id(cache), cache.layers[0].keys.data_ptr(), cache.layers[-1].values.data_ptr()))
        assert runs[0] == runs[1] == runs[2] and storage[0] == storage[1]  # the same storage, reused
    # transformers marks the cache static without an address guard (torch >= 2.10's default), so a
    # new evaluation cache re-records the CUDA graph but never recompiles the decode step
    assert {layer.keys._dynamo_static_input_type for layer in cache.layers} == {"unguarded"}


# ------------------------------------------------------------------------------------------
# Verifier
# ------------------------------------------------------------------------------------------
B, H = "boxed", "hash"
VERIFIER_CASES = [  # (response, reference, format, right)
    # the prediction: the last \boxed{} (balanced braces, \fbox too), else a final 'Answer: X'
    (r"so \boxed{42}.", "42", B, 1), (r"\boxed{41}", "42", B, 0), (r"\boxed{3} then \boxed{4}", "4", B, 1),
    (r"\boxed{4} then \boxed{3}", "4", B, 0), (r"\boxed{\frac{1}{2}}", "1/2", B, 1), (r"\fbox{9}", "9", B, 1),
    (r"\boxed {7}", "7", B, 1), (r"\boxed{7", "7", B, 0),
    ("The sum is 7.\nAnswer: 7", "7", B, 1), ("**Answer:** 7", "7", B, 1),
    ("Answer: 6\nAnswer: 7", "7", B, 1), (r"\boxed{7} and Answer: 8", "7", B, 1),
    # no answer in the format: 0, never the last number in the text
    ("The answer is 7.", "7", B, 0), ("#### 7", "7", B, 0), ("", "7", B, 0), (r"\boxed{}", "7", B, 0),
    ("The answer is 7.", "7", H, 0), (r"\boxed{7}", "7", H, 0),
    # exact numbers: decimals, separators, $, fractions, signs, a trailing period, \text{} units
    (r"\boxed{10.00}", "10", B, 1), (r"\boxed{\$1,000.}", "1000", B, 1), (r"\boxed{$1,000$}", "1000", B, 1),
    (r"\boxed{.5}", "0.5", B, 1), (r"\boxed{.5}", "5", B, 0), (r"\boxed{- 3}", "-3", B, 1),
    (r"\boxed{- 3}", "3", B, 0), (r"\boxed{2,5}", "25", B, 0), (r"\boxed{1,234,567}", "1234567", B, 1),
    (r"\boxed{\dfrac{3}{4}}", "3/4", B, 1), (r"\boxed{\tfrac{3}{4}}", "0.75", B, 1),
    (r"\boxed{2}", "1/2", B, 0), (r"\boxed{-\frac{1}{2}}", "-0.5", B, 1),
    (r"\boxed{12\text{ cm}}", "12", B, 1),
    (r"\boxed{\text{12}}", "12", B, 1), (r"\boxed{x = 5}", "5", B, 1), ("\\boxed{\u22124}", "-4", B, 1),
    (r"\boxed{007}", "7", B, 1), (r"\boxed{3/0}", "3/0", B, 1),
    # otherwise normalised strings: whitespace, \left \right, \!, dfrac as frac
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)", B, 1), (r"\boxed{\dfrac{\pi}{2}}", r"\frac{\pi}{2}", B, 1),
    (r"\boxed{3\!\sqrt{2}}", r"3\sqrt{2}", B, 1), (r"\boxed{3\sqrt{2}}", r"2\sqrt{3}", B, 0),
    # hash: what follows the last '####'; GSM8K's pitfalls
    ("So the total is #### 72", "72", H, 1), ("#### $1,000.", "1000", H, 1), ("####10", "10", H, 1),
    ("#### -7", "-7", H, 1), ("#### 10.00", "10", H, 1), ("#### - 3", "-3", H, 1), ("#### - 3", "3", H, 0),
    ("#### .5", "0.5", H, 1), ("#### 2,5", "25", H, 0), ("#### 2", "1/2", H, 0), ("#### 1/2", "0.5", H, 1),
    ("first #### 3 then #### 4", "4", H, 1), ("#### 4 then #### 3", "4", H, 0),
    ("#### 12 apples", "12", H, 1), ("#### 8\nmore text 9", "8", H, 1), ("#### none; earlier 9", "9", H, 0),
    # references: a plain answer or a GSM8K solution ending in '#### N'
    ("#### 10", "Natalia sold 10 clips.\n#### 10", H, 1), (r"\boxed{10}", "Sold 4+6=10.\n#### 10", B, 1),
    # unit words from a fixed list, degrees, brace-less LaTeX, braces around the whole answer
    (r"\boxed{5 cm}", "5", B, 1), (r"\boxed{5 cm}", "6", B, 0), (r"\boxed{12 dollars}", "12", B, 1),
    (r"\boxed{5 square feet}", "5", B, 1), (r"\boxed{2 \pi}", "2", B, 0), (r"\boxed{3 x}", "3", B, 0),
    (r"\boxed{3x}", "3", B, 0), ("Answer: 12 dollars", "12", B, 1), ("#### 5 cm", "5", H, 1),
    (r"\boxed{90^\circ}", "90", B, 1), (r"\boxed{90^{\circ}}", "90", B, 1), (r"\boxed{90^\circ}", "45", B, 0),
    (r"\boxed{\sqrt2}", r"\sqrt{2}", B, 1), (r"\boxed{\sqrt2}", r"\sqrt{3}", B, 0),
    (r"\boxed{\frac12}", "1/2", B, 1), (r"\boxed{\frac12}", r"\frac{1}{3}", B, 0),
    (r"\boxed{\frac1{2}}", "0.5", B, 1), (r"\boxed{3\sqrt2}", r"3\sqrt{2}", B, 1),
    (r"\boxed{{5}}", "5", B, 1), (r"\boxed{{{x+1}}}", "x+1", B, 1), (r"\boxed{{1}{2}}", "12", B, 0),
    (r"\boxed{{1}{2}}", "{1}{2}", B, 1),
]


@pytest.mark.parametrize("response,reference,answer_format,want", VERIFIER_CASES)
def test_verifier(response, reference, answer_format, want):
    assert sdpg.reward(response, reference, answer_format) == (1.0 if want else -1.0)  # the authors' scale


def test_normalise_numbers_and_strings():
    assert sdpg.normalise("$1,000.") == 1000 and sdpg.normalise("-.5") == Fraction(-1, 2)
    assert sdpg.normalise(r"\frac{3}{4}") == Fraction(3, 4) and sdpg.normalise("2,5") == "2,5"
    assert sdpg.normalise(r"\left( 1 ,2\right)") == "(1,2)" and sdpg.normalise("  ") is None
    assert sdpg.reference_answer("Half is 24.\n#### 24") == 24 and sdpg.reference_answer("x+1") == "x+1"
    assert sdpg.reference_answer("...") is None and sdpg.reference_answer("") is None


def test_defaults_match_the_readme_table():
    import re
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    table = readme[readme.index("### Flags that matter"):readme.index("`python sdpg.py --help`")]
    defaults = {f.name: f.default for f in sdpg.dataclasses.fields(sdpg.Config)}
    checked = 0
    for flags, values in re.findall(r"^\| (`--[^|]*) \| ([^|]*) \|", table, re.M):
        names = re.findall(r"`--([\w-]+)`", flags.split(" / ")[0])
        for name, value in zip(names, values.split(", ")):
            want = defaults[name.replace("-", "_")]
            if name == "gate":
                assert (value == "on") == want
            else:
                assert type(want)(value.strip("` ")) == want, name
            checked += 1
    assert checked >= 25 and defaults["batch_size"] == 128 and defaults["ppo_minibatches"] == 8


def test_readme_names_only_functions_that_exist():
    import re
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    start = readme.index("| Paper | What | Function in `sdpg.py` |")
    table = readme[start:readme.index("Aggregation is a token mean")]
    rows = [row for row in table.splitlines()[2:] if row.startswith("|")]
    names = {n for row in rows for n in re.findall(r"`(\w+)`", row.rsplit("|", 2)[1])}
    assert {"group_advantages", "logit_grad", "sdpg_head_loss", "train"} <= names
    assert [n for n in names if not callable(getattr(sdpg, n, None))] == []
    # every snake_case name in backquotes in the prose (functions, metrics) is a word of sdpg.py
    with open(os.path.join(HERE, "sdpg.py")) as f:
        words = set(re.findall(r"\w+", f.read()))
    others = {"k_norm", "use_kl_in_reward"} | set(globals())  # transformers', verl's, and our tests
    assert sorted(set(re.findall(r"`([a-z]+(?:_[a-z0-9]+)+)`", readme)) - words - others) == []


def test_resolve_model_name(tmp_path):
    assert sdpg.resolve_model_name("Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert sdpg.resolve_model_name("Qwen3-1.7B-Base") == "Qwen/Qwen3-1.7B-Base"
    assert sdpg.resolve_model_name("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"
    with pytest.raises(sdpg.UserError, match="is not a model directory"):
        sdpg.resolve_model_name(str(tmp_path))  # no config.json
    (tmp_path / "config.json").write_text("{}")
    assert sdpg.resolve_model_name(str(tmp_path)) == str(tmp_path)
    with pytest.raises(sdpg.UserError):
        sdpg.resolve_model_name("./no/such/model")


def test_gsm8k_rows_strip_calculator_annotations(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": "Ann has 48 cards and gives half away. How many are left?",
             "answer": "Half of 48 is 48/2=<<48/2=24>>24.\nSo 24 are left.\n#### 24"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows)
    (p,) = sdpg.load_problems("gsm8k", "train")
    (message,) = p["messages"]
    assert p["answer"] == "24" and "<<" not in message["content"]
    last_line = sdpg.HINT_SOLUTION.split("\n")[-1].format(answer=24)
    assert message["content"].endswith("So 24 are left.\n" + last_line)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nsecond line")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(sdpg.UserError,
                       match=r"openai/gsm8k \(test; .*HF_HUB_OFFLINE=1.*\): ConnectionError: Couldn't reach"):
        sdpg.load_problems("gsm8k", "test")


# ------------------------------------------------------------------------------------------
# Prompts, rollouts and masks
# ------------------------------------------------------------------------------------------
def test_teacher_prompt_holds_context_and_responses_align(tiny):
    from transformers import AutoModelForCausalLM
    tok = make_tokenizer()
    problems = sdpg.load_problems(tiny["data"], "train")[:2]
    built = sdpg.build_prompts(tok, problems, 4096, with_teacher=True)
    # masks: up to and including the first stop token (EOS == pad), never past it
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    stop = {eos, im_end}
    assert sdpg.cut_at_stop([5, 6, im_end, eos, eos], stop) == ([5, 6, im_end], False)
    assert sdpg.cut_at_stop([eos, eos], stop) == ([eos], False)
    assert sdpg.cut_at_stop([5, 6, 7], stop) == ([5, 6, 7], True)
    # the hidden states picked for each response token predict exactly that token
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float64)
    responses = [[5, 9, im_end], [7, eos]]
    prompts, teacher_prompts = [p["student_ids"] for p in built], [p["teacher_ids"] for p in built]
    cfg = sdpg.Config(micro_batch_tokens=10**6)
    for given in (prompts, teacher_prompts):  # pi_ref and pi_old score after x; RLSD's teacher after (c, x)
        got = sdpg.score_tokens(model, given, responses, cfg, eos)
        for i, (p, r) in enumerate(zip(given, responses)):
            logits = model(input_ids=torch.tensor([p + r])).logits[0].log_softmax(-1)
            want = logits[len(p) - 1: len(p) - 1 + len(r)].gather(1, torch.tensor(r)[:, None]).squeeze(1)
            assert torch.allclose(got[i].double(), want, atol=1e-5)
    # teacher rows: same response ids after a different prompt
    hs = sdpg.response_hidden(model, prompts, responses, eos)
    ht = sdpg.response_hidden(model, teacher_prompts, responses, eos)
    assert hs.shape == ht.shape == (5, model.config.hidden_size) and not torch.allclose(hs, ht)


FIGURE_4_STUDENT = ("Solve the following math problem step by step. "
                    "Present your final answer inside \\boxed{}, for example \\boxed{42}.\n{question}\n"
                    "Remember to put your final answer inside \\boxed{}.")
FIGURE_4_HINT = ("\n[Hint] The correct answer is {answer}. "
                 "A common way to solve this is:\n{solution}\n[Instruction] "
                 "If possible, derive the answer {answer} using an alternative, equally rigorous "
                 "mathematical approach (e.g., algebraic vs geometric, or different substitution). "
                 "If no alternative exists, articulate the standard approach with exceptional clarity. "
                 "Do NOT state that you were given the answer or reference.")


def test_prompts_are_figure_4_verbatim(tiny):
    tok = make_tokenizer()
    problems = sdpg.load_problems(tiny["data"], "train")[:2]  # row 2 has a worked solution, row 1 none
    chat = lambda text: f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    for fmt in ("boxed", "hash"):
        built = sdpg.build_prompts(tok, problems, 4096, with_teacher=True, answer_format=fmt)
        for i, p in enumerate(built):
            question = f"Tom has {i} pens and gets {7 - i} more. How many pens?"
            student = FIGURE_4_STUDENT.replace("{question}", question)
            if fmt == "hash":
                student = student.replace("inside \\boxed{}, for example \\boxed{42}",
                                          "after ####, for example #### 42")
                student = student.replace("inside \\boxed{}.", "after ####.")
            hint = (FIGURE_4_HINT.format(answer=7, solution=f"{i}+{7 - i}=7") if i
                    else "\n[Hint] The correct answer is 7.")  # no solution: the first sentence alone
            assert tok.decode(p["student_ids"]) == chat(student)
            assert tok.decode(p["teacher_ids"]) == chat(student + hint)


def write_verl_parquet(path, rows):
    """Rows in the authors' verl format: chat messages with the marker, reward_model.ground_truth."""
    import pandas as pd
    pd.DataFrame([{"data_source": "math_dapo", "ability": "math", "extra_info": {"index": i},
                   "prompt": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": question + ("[TEACHER_CONTEXT_TOKEN]" + context
                                                                      if context else "")}],
                   "reward_model": {"ground_truth": answer, "style": "rule"}}
                  for i, (question, answer, context) in enumerate(rows)]).to_parquet(path)
    return str(path)


def test_verl_parquet_with_teacher_context_trains_and_evaluates(tiny, tmp_path, monkeypatch):
    rows = [(f"What is {a} + 3? Put it in \\boxed{{}}.", str(a + 3), f"\n[Hint] It is {a + 3}.")
            for a in range(8)]
    data = write_verl_parquet(tmp_path / "train.parquet", rows)
    evals = write_verl_parquet(tmp_path / "aime-like.parquet", [(q, a, "") for q, a, _ in rows[:3]])
    tok = make_tokenizer()
    (p,) = sdpg.build_prompts(tok, sdpg.load_problems(data, "train")[:1], 4096, with_teacher=True)
    system = "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert tok.decode(p["student_ids"]) == (system + "<|im_start|>user\nWhat is 0 + 3? Put it in \\boxed{}."
                                            "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(p["teacher_ids"]) == (system + "<|im_start|>user\nWhat is 0 + 3? Put it in \\boxed{}."
                                            "\n[Hint] It is 3."
                                            "<|im_end|>\n<|im_start|>assistant\n") and p["answer"] == "3"
    seen = []  # every prompt a forward pass sees
    real_hidden = sdpg.response_hidden
    monkeypatch.setattr(sdpg, "response_hidden", lambda m, p, *a: seen.append(p) or real_hidden(m, p, *a))
    out = tmp_path / "verl"
    sdpg.main(run_args(tiny, out, "--task", data, "--eval-task", f"{evals},{tiny['data']}", "--no-gate"))
    rows = read_metrics(out)
    assert rows[0]["accuracy/aime-like"] is not None and rows[0]["accuracy/problems"] is not None
    assert rows[0]["accuracy"] == pytest.approx(
        (rows[0]["accuracy/aime-like"] + rows[0]["accuracy/problems"]) / 2)
    # the default beta windows scale with --total-steps 2: T_warm = 2/8, T_decay = 7 * 2/8
    assert rows[1]["beta"] == pytest.approx(1e-3 * (2 - 1) / 1.75) and rows[2]["beta"] == 0.0
    decoded = {tok.decode(ids) for batch in seen for ids in batch}
    assert any("[Hint]" in t for t in decoded)  # the teacher ran with the context ...
    assert all("TEACHER_CONTEXT" not in t for t in decoded)  # ... never with the marker


def test_the_tokenizer_train_loads_is_the_one_the_tests_build(tiny):
    """Through AutoTokenizer, as train loads it, a prompt keeps its spaces and newline: one id a character."""
    from transformers import AutoTokenizer
    built, loaded = make_tokenizer(), AutoTokenizer.from_pretrained(tiny["model"])
    ids = loaded("a b\nc", add_special_tokens=False)["input_ids"]
    assert ids == built("a b\nc", add_special_tokens=False)["input_ids"] and len(ids) == 5
    assert loaded.decode(ids) == "a b\nc"
    chat = [dict(role="user", content="Tom has 3 pens.\n#### 7")]
    assert sdpg.chat_prompt(loaded, chat) == sdpg.chat_prompt(built, chat)


def test_chat_prompt_without_a_template_is_the_plain_text():
    tok = make_tokenizer()
    tok.chat_template = None
    ids = sdpg.chat_prompt(tok, [dict(role="user", content="Tom has 3 pens.")])
    assert tok.decode(ids) == "Tom has 3 pens.\n"


def test_stop_ids_are_eos_and_the_chat_end_of_turn():
    from types import SimpleNamespace
    tok = make_tokenizer()
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    model = lambda eos_ids: SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos_ids))
    assert sdpg.stop_token_ids(tok, model(eos)) == sorted({eos, im_end})  # no <|eot_id|>, no <unk>
    assert sdpg.stop_token_ids(tok, model([eos, 5])) == sorted({eos, im_end, 5})


def test_long_prompts_are_skipped_with_a_warning(tiny, capsys):
    problems = sdpg.load_problems(tiny["data"], "train")
    problems[1] = dict(problems[1], messages=[{"role": "user", "content": "How many? " * 100}])
    kept = sdpg.build_prompts(make_tokenizer(), problems, 700, with_teacher=True)
    assert len(kept) == len(problems) - 1 and problems[1]["messages"] not in [p["messages"] for p in kept]
    assert "skipped 1 of 12 prompts" in capsys.readouterr().err


def test_micro_batches_respect_the_budget():
    lengths = {7: 5, 2: 9, 5: 3, 0: 12, 3: 4, 1: 4}  # sample: prompt + response tokens
    prompts, responses = [[0] * 2] * 8, [[0] * (lengths.get(i, 2) - 2) for i in range(8)]
    batches = sdpg.micro_batches(prompts, responses, list(lengths), 20)
    assert batches == [[7, 2], [5], [0], [3, 1]]  # in order; 2 x 9 fits, then 3 x 9 and 2 x 12 would not
    assert all(len(b) * max(lengths[i] for i in b) <= 20 for b in batches)


# ------------------------------------------------------------------------------------------
# The training loop, end to end
# ------------------------------------------------------------------------------------------
def finite_row(row):
    return all(v is None or math.isfinite(v) for v in row.values())


def test_train_subprocess_writes_metrics_and_loadable_checkpoint(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sdpg.py"),
                           *run_args(tiny, out, "--ppo-minibatches", "2", "--beta-warmup", "0")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and all(finite_row(r) for r in rows)
    for key in ("reward", "zero_spread_frac", "gate_ratio", "beta", "opd_kl", "ref_kl", "clip_frac",
                "entropy", "response_len", "response_len_max", "truncated_frac", "grad_norm", "lr",
                "sample_s", "verify_s", "ref_s", "teacher_s", "update_s", "tokens_per_s", "peak_gpu_gb"):
        assert key in rows[1]
    assert rows[-1]["accuracy"] is not None and rows[1]["accuracy"] is None
    assert "--- problems sample (reference '7'):" in proc.stdout  # evaluation shows a few responses
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert os.path.exists(out / "checkpoint-2" / "model.safetensors")
    assert not [d for d in os.listdir(out) if d.startswith(".tmp")]


def test_learning_raises_reward(tiny, tmp_path):
    data = write_problems(tmp_path / "p32.jsonl", n=32)
    out = tmp_path / "learn"
    sdpg.main(["--model", tiny["model"], "--task", data, "--out-dir", str(out), "--device", "cpu",
               "--batch-size", "8", "--group-size", "8", "--max-response-tokens", "3", "--total-steps", "20",
               "--eval-n", "8", "--eval-every", "0", "--save-every", "0", "--lr", "1e-2", "--lr-warmup", "1",
               "--beta", "0.01", "--beta-warmup", "0", "--beta-decay", "0", "--ppo-minibatches", "1",
               "--answer-format", "hash"])  # the tokenizer has '#### 7' as one token
    rows = read_metrics(out)[1:]
    rewards = [r["reward"] for r in rows]  # +1/-1: the share right is (reward + 1) / 2
    assert sum(rewards[:4]) / 4 < -0.8 and sum(rewards[-5:]) / 5 > -0.4, rewards
    assert all(r["correct_frac"] == pytest.approx((r["reward"] + 1) / 2) for r in rows)
    assert any(r["teacher_tokens"] > 0 and r["opd_kl"] is not None for r in rows)  # distillation ran


def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    from safetensors.torch import load_file
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    extra = ("--total-steps", "4", "--save-every", "2", "--ppo-minibatches", "2", "--beta-warmup", "0")
    sdpg.main(run_args(tiny, full, *extra)[:-8] + list(extra))
    # in a copy of the run's directory, as `--resume out/checkpoint-2` would be: its rows of steps 0-2
    # stay, those of steps 3 and 4 are written again
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    sdpg.main(["--resume", str(resumed / "checkpoint-2")])  # the recorded flags, a --model not the default
    per_process = ("tokens_per_s", "decode_compiles", "cudagraph_skips")  # timings, and counts that restart
    timing = lambda r: {k: v for k, v in r.items() if not k.endswith("_s") and k not in per_process}
    assert [r["step"] for r in read_metrics(resumed)] == [0, 1, 2, 3, 4]
    assert [timing(r) for r in read_metrics(full)] == [timing(r) for r in read_metrics(resumed)]
    a, b = (load_file(d / "checkpoint-4" / "model.safetensors") for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_an_earlier_run_is_never_touched(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    sdpg.main(run_args(tiny, out, "--save-every", "1"))
    before, checkpoint = snapshot(out), str(out / "checkpoint-1")
    attempts = {  # a fresh run into it (also with a flag that once failed after setup), or a changed resume
        "fresh run": (run_args(tiny, out), "holds a run: continue it with --resume"),
        "fresh run, temperature 0": (run_args(tiny, out, "--temperature", "0"), "--temperature 0.0: must be"),
        "resume, another lr": (["--resume", checkpoint, "--lr", "0.002"],
                               "a resumed run keeps its flags, but --lr 0.002 (the run's: 0.001) differ"),
        "resume, another model and seed": (["--resume", checkpoint, "--model", "Qwen2.5-0.5B", "--seed", "1"],
                                           f"(the run's: {tiny['model']!r}), --seed 1 (the run's: 0)"),
        "resume, one checkpoint kept": (["--resume", checkpoint, "--keep-checkpoints", "1"], "--keep-check"),
        "resume from a non-checkpoint": (["--resume", str(out)], "is not a checkpoint directory"),
    }
    for name, (args, message) in attempts.items():
        with pytest.raises(SystemExit) as exit:
            sdpg.main(args)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert exit.value.code == 2 and len(err) == 1 and message in err[0], (name, err)
        assert snapshot(out) == before, name
    data = open(tiny["data"]).read()
    with pytest.raises(SystemExit):
        sdpg.main(run_args(tiny, tiny["data"]))  # an --out-dir that is a file
    assert "is a file" in capsys.readouterr().err and open(tiny["data"]).read() == data


def test_resume_takes_free_flags_and_writes_into_the_checkpoint_parent(tiny, tmp_path):
    out = tmp_path / "run"
    sdpg.main(run_args(tiny, out, "--save-every", "1", "--total-steps", "3"))
    state = torch.load(out / "checkpoint-2" / "trainer_state.pt")  # weights_only: the flags are plain values
    assert state["flags"]["model"] == tiny["model"] and state["flags"]["lr"] == 1e-3
    shutil.rmtree(out / "checkpoint-3")
    sdpg.main(["--resume", str(out / "checkpoint-2"), "--eval-every", "1", "--keep-checkpoints", "2"])
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1]["accuracy"] is not None
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-3", "metrics.jsonl"]


def test_sampled_evaluation_never_moves_a_rollout(tiny, tmp_path):
    # evaluation is free on resume because it runs on a fork of the RNG: the training rows are the same
    # with sampled evaluations after every step and with none in between
    sdpg.main(run_args(tiny, tmp_path / "quiet", "--total-steps", "3"))
    sdpg.main(run_args(tiny, tmp_path / "busy", "--total-steps", "3", "--eval-every", "1",
                       "--eval-samples", "2"))
    training = lambda r: {k: v for k, v in r.items() if not k.endswith("_s") and not k.startswith("accuracy")
                          and k not in ("tokens_per_s", "decode_compiles")}
    quiet, busy = read_metrics(tmp_path / "quiet")[1:], read_metrics(tmp_path / "busy")[1:]
    assert busy[0]["accuracy"] is not None and [training(r) for r in quiet] == [training(r) for r in busy]


def test_keep_checkpoints_sorts_by_step_as_a_number(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    cfg = sdpg.Config(out_dir=str(tmp_path), keep_checkpoints=2)
    for step in (8, 9, 10, 100):  # by name, checkpoint-10 and checkpoint-100 would come first
        sdpg.save_checkpoint(cfg, step, model, make_tokenizer(), optimizer, scheduler, 0)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-100"]


def test_device_is_printed_once_with_the_cpu_fallback(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sdpg.main(run_args(tiny, tmp_path / "out", "--total-steps", "1", "--device", "auto"))
    assert capsys.readouterr().out.splitlines()[0] == "device: cpu (--device auto found no CUDA device)"


TRACKED_RUN = """
import json, shutil, sys, sdpg
from trackio.sqlite_storage import SQLiteStorage
args, out = json.loads(sys.argv[1]), sys.argv[2]
sdpg.main(args + ["--report-to", "trackio", "--run-name", "tiny", "--save-every", "1"])
sdpg.main(["--resume", out + "/checkpoint-1"])  # in place: step 2 again, into the same tracker run
print(json.dumps(SQLiteStorage.get_logs("sdpg", "tiny")))
"""


def test_trackio_gets_every_row_and_a_resume_continues_its_run(tiny, tmp_path):
    pytest.importorskip("trackio")
    out = tmp_path / "out"
    env = dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", TRACKED_RUN, json.dumps(run_args(tiny, out)), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=HERE, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["step"] for r in logged] == [0, 1, 2, 2]
    for row, got in zip(read_metrics(out), logged[:2] + logged[3:]):  # the file's rows: 0, 1 and the new 2
        stored = {k: v for k, v in got.items() if k not in ("timestamp", "__step")}  # trackio's own keys
        assert stored == {k: v for k, v in row.items() if v is not None}


def count_model_loads(monkeypatch):
    """The paths of the models that sdpg loads, in order (tokenizers not counted)."""
    loads, real = [], sdpg.load_pretrained

    def load(kind, path, **kwargs):
        loads.extend([path] if kind == "AutoModelForCausalLM" else [])
        return real(kind, path, **kwargs)
    monkeypatch.setattr(sdpg, "load_pretrained", load)
    return loads


def test_grpo_baseline_loads_no_reference_and_runs_no_teacher(tiny, tmp_path, monkeypatch):
    loads = count_model_loads(monkeypatch)
    hidden_calls = []
    real_hidden = sdpg.response_hidden
    monkeypatch.setattr(sdpg, "response_hidden",
                        lambda m, p, *a: hidden_calls.append(p) or real_hidden(m, p, *a))
    sdpg.main(run_args(tiny, tmp_path / "grpo", "--beta", "0", "--alpha", "0"))
    rows = read_metrics(tmp_path / "grpo")[1:]
    assert len(loads) == 1  # the policy only: no reference model
    assert all(r["teacher_tokens"] == 0 and r["opd_kl"] is None and r["ref_kl"] is None for r in rows)
    assert hidden_calls and all("[Hint]" not in make_tokenizer().decode(p[0]) for p in hidden_calls)
    loads.clear()
    sdpg.main(run_args(tiny, tmp_path / "sdpg", "--beta-warmup", "0", "--grad-checkpointing"))
    assert len(loads) == 2  # policy and frozen reference
    assert finite_row(read_metrics(tmp_path / "sdpg")[-1])


def test_kl_in_reward_by_hand():
    old = [torch.tensor(x) for x in ([-1.0, -2.0], [-0.5], [-3.0, -1.0, -1.0], [-2.0])]
    ref = [torch.tensor(x) for x in ([-1.5, -2.0], [-0.5], [-1.0, -1.0, -1.0], [-2.5])]
    penalty = sdpg.kl_in_reward(old, ref, 0.1)
    assert torch.allclose(penalty, torch.tensor([0.05, 0.0, -0.2, 0.05]))  # 0.1 * sum_t (old - ref)
    rewards = torch.tensor([1.0, -1.0, 1.0, 1.0])  # +1 right, -1 wrong: the penalty weighs as in verl
    shaped = (rewards - penalty).double()  # groups of 2: (0.95, -1.0) and (1.2, 0.95)
    by_hand = []
    for a, b in ((0.95, -1.0), (1.2, 0.95)):
        mean, std = (a + b) / 2, abs(a - b) / math.sqrt(2)  # the unbiased std of two values
        by_hand += [(a - mean) / (std + 1e-6), (b - mean) / (std + 1e-6)]
    adv = sdpg.group_advantages(rewards - penalty, 2)
    assert torch.allclose(adv.double(), torch.tensor(by_hand, dtype=torch.float64), atol=1e-5)
    # the second group has equal rewards, yet the penalty alone sets its advantages, as in verl
    assert sdpg.group_advantages(rewards, 2)[2:].eq(0).all() and adv[2] > 0 > adv[3]
    assert shaped[0] > shaped[1]


def test_grpo_baseline_with_kl_in_reward(tiny, tmp_path, monkeypatch):
    loads, scored, seen = count_model_loads(monkeypatch), [], []
    real_score, real_adv = sdpg.score_tokens, sdpg.group_advantages
    monkeypatch.setattr(sdpg, "score_tokens", lambda m, *a: scored.append(real_score(m, *a)) or scored[-1])
    monkeypatch.setattr(sdpg, "group_advantages", lambda r, g: seen.append(r) or real_adv(r, g))
    baseline = ["--beta", "0", "--alpha", "0", "--eps-high", "0.2", "--clip-c", "1000",
                "--ppo-minibatches", "1"]
    sdpg.main(run_args(tiny, tmp_path / "off", *baseline))
    assert len(loads) == 1 and not scored  # coefficient 0: no reference, no extra forward
    assert all(r["kl_penalty"] is None for r in read_metrics(tmp_path / "off")[1:])
    loads.clear(), seen.clear()
    sdpg.main(run_args(tiny, tmp_path / "on", *baseline, "--kl-reward", "0.5", "--lr", "3e-2"))
    assert len(loads) == 2 and len(scored) == 4  # the reference, then pi_old, at each of the 2 steps
    rows = read_metrics(tmp_path / "on")[1:]
    for step, row in enumerate(rows):
        ref, old = scored[2 * step], scored[2 * step + 1]
        penalty = torch.stack([0.5 * (o - r).sum() for o, r in zip(old, ref)])
        rewards = seen[step] + penalty  # what group_advantages was given, plus the penalty back
        assert torch.allclose(rewards.abs(), torch.ones(len(rewards)), atol=1e-5)  # +1 or -1
        assert row["kl_penalty"] == pytest.approx(penalty.mean().item(), rel=1e-5, abs=1e-9)
        assert row["reward"] == pytest.approx(rewards.round().mean().item())  # the verifier's score
    assert rows[0]["kl_penalty"] == 0.0 != rows[1]["kl_penalty"]  # pi_old = pi_ref until the first update


def readme_table1_flags():
    """The commands of the README's "Reproducing Table 1" by --out-dir name: their flags after $COMMON,
    less --task and --out-dir (the tiny run gives its own), with the shell loop's $KL filled in."""
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Reproducing Table 1"):]
    block = section.split("```")[1].replace("\\\n", " ")
    runs = {}
    for line in block.splitlines():
        if "sdpg.py $COMMON" in line:
            words = line.split("sdpg.py $COMMON")[1].replace("; done", "").split()
            name = os.path.basename(words[words.index("--out-dir") + 1])
            flags = [w for i, w in enumerate(words)
                     if w not in ("--task", "--out-dir") and words[i - 1] not in ("--task", "--out-dir")]
            for kl in ("urkl", "ufkl") if "$KL" in line else ("",):
                runs[name.replace("$KL", kl)] = [f.replace("$KL", kl) for f in flags]
    return runs


def readme_rlsd_flags():
    return readme_table1_flags()["rlsd-4b"]


@pytest.mark.parametrize("name", ["grpo-4b", "sdpg-urkl-4b", "sdpg-ufkl-4b"])  # rlsd-4b: the test below
def test_readme_table1_commands_run_two_steps(tiny, tmp_path, name):
    assert sorted(readme_table1_flags()) == ["grpo-4b", "rlsd-4b", "sdpg-ufkl-4b", "sdpg-urkl-4b"]
    sdpg.main(run_args(tiny, tmp_path, *readme_table1_flags()[name]))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2] and all(finite_row(r) for r in rows)


def mixed_rewards(monkeypatch):
    """A verifier of +1/-1 in a fixed cycle (evaluation takes 4 at step 0): of the groups of 4, the first
    of each step is flat (A_i = 0) and the second has spread; so are the third and fourth."""
    import itertools
    cycle = itertools.cycle([1.0, -1.0, -1.0, -1.0] + [-1.0] * 4)
    monkeypatch.setattr(sdpg, "reward", lambda *a: next(cycle))


def test_readme_rlsd_command_scores_the_teacher_only_where_a_is_nonzero(tiny, tmp_path, monkeypatch):
    flags = readme_rlsd_flags()
    assert flags == "--beta 0 --alpha 0 --rlsd-lambda 0.5 --eps-high 0.2 --clip-c 3".split()
    assert (sdpg.Config.rlsd_decay, sdpg.Config.rlsd_eps_w) == (50, 0.2)  # the rest of the authors' script
    mixed_rewards(monkeypatch)
    scored, advantages, updates = [], [], []
    real_score, real_adv, real_update = sdpg.score_tokens, sdpg.group_advantages, sdpg.update_policy
    monkeypatch.setattr(sdpg, "score_tokens", lambda m, p, r, *a: scored.append((p, real_score(m, p, r, *a)))
                        or scored[-1][1])
    monkeypatch.setattr(sdpg, "group_advantages",
                        lambda *a: advantages.append(real_adv(*a)) or advantages[-1])
    monkeypatch.setattr(sdpg, "update_policy", lambda m, o, r, *a: updates.append(list(r.advantages))
                        or real_update(m, o, r, *a))
    sdpg.main(run_args(tiny, tmp_path, *flags))
    rows, tok = read_metrics(tmp_path)[1:], make_tokenizer()
    assert [r["rlsd_lambda"] for r in rows] == [0.49, 0.48] and all(finite_row(r) for r in rows)
    for step, row in enumerate(rows):
        (_, old), (teacher_prompts, teacher) = scored[2 * step: 2 * step + 2]  # pi_old on x, then on (c, x)
        reweighted = advantages[step].nonzero().view(-1).tolist()
        assert len(reweighted) == len(old) // 2 == len(teacher)  # the rows the teacher sees: A_i != 0 only
        assert all("[Hint]" in tok.decode(p) for p in teacher_prompts)
        delta = []
        for j, i in enumerate(reweighted):  # A_t against Appendix B in float64, token by token
            a_i = advantages[step][i].item()
            tokens = [rlsd_by_hand(a_i, t, o, row["rlsd_lambda"], 0.2)
                      for t, o in zip(teacher[j].tolist(), old[i].tolist())]
            assert torch.allclose(updates[step][i].double(), torch.tensor([t[0] for t in tokens]).double(),
                                  atol=1e-6)
            delta += [t[1] for t in tokens]
        assert all(updates[step][i] == 0 for i in set(range(len(old))) - set(reweighted))
        assert row["rlsd_delta"] == pytest.approx(sum(delta) / len(delta), abs=1e-6)
        assert 0.8 <= row["rlsd_weight"] <= 1.2 and 0 <= row["rlsd_clip_frac"] <= 1


def test_rlsd_past_t_lambda_updates_as_plain_grpo_bit_for_bit(tiny, tmp_path, monkeypatch):
    """Past T_lambda (lambda_k = 0) A_t = A_i: the run is GRPO's, and scores no teacher prompt."""
    from safetensors.torch import load_file
    mixed_rewards(monkeypatch)
    prompts_scored = []
    real_score = sdpg.score_tokens
    monkeypatch.setattr(sdpg, "score_tokens",
                        lambda m, p, *a: prompts_scored.extend(p) or real_score(m, p, *a))
    grpo = ["--beta", "0", "--alpha", "0", "--eps-high", "0.2", "--clip-c", "3"]
    sdpg.main(run_args(tiny, tmp_path / "grpo", *grpo))
    mixed_rewards(monkeypatch)  # the same rewards again
    sdpg.main(run_args(tiny, tmp_path / "rlsd", *grpo, "--rlsd-lambda", "0.5", "--rlsd-decay", "1"))
    a, b = (load_file(tmp_path / d / "checkpoint-2" / "model.safetensors") for d in ("grpo", "rlsd"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = read_metrics(tmp_path / "rlsd")[1:]
    assert [r["rlsd_lambda"] for r in rows] == [0.0, 0.0] and all(r["rlsd_delta"] is None for r in rows)
    assert not any("[Hint]" in make_tokenizer().decode(p) for p in prompts_scored)
    assert any(r["grad_norm"] > 0 for r in read_metrics(tmp_path / "grpo")[1:])  # the update is not empty


def test_per_token_advantages_reach_the_head_as_per_sample_ones(tiny):
    """update_policy takes a (|y_i|,) tensor of A_t in place of a sample's A_i: constant, the same update."""
    from transformers import AutoModelForCausalLM
    steps = []
    for per_token in (False, True, "one token moved"):
        model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float64)
        rollouts = injected_rollouts(tiny["model"])
        if per_token:
            rollouts.advantages = [a.expand(len(r)).clone() for a, r in zip(rollouts.advantages,
                                                                              rollouts.response_ids)]
        if per_token == "one token moved":
            rollouts.advantages[0][0] += 0.5
        cfg = sdpg.Config(ppo_minibatches=1, grad_clip=1e9)
        sdpg.update_policy(model, torch.optim.SGD(model.parameters(), lr=1.0), rollouts, cfg, 0)
        steps.append(torch.cat([p.detach().flatten() for p in model.parameters()]))  # SGD: minus the gradient
    assert torch.equal(steps[0], steps[1]) and not torch.allclose(steps[0], steps[2], rtol=0, atol=1e-9)


class OnDevice(torch.Tensor):
    """A tensor that stands for one on the GPU. The CPU suite has one device, so a device mismatch
    cannot show there; this makes one show: as on CUDA, an op that meets it with a CPU tensor of
    one or more dimensions raises, and .cpu() or .to(a device) give a plain (CPU) tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        to_device = func is torch.Tensor.to and any(isinstance(a, (str, torch.device)) for a in leaves)
        if func is torch.Tensor.cpu or to_device:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        if any(type(a) is torch.Tensor and a.dim() > 0 for a in leaves):
            raise RuntimeError(f"{func.__name__}: a device tensor meets a CPU tensor")
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("minibatches", ["1", "2"])
def test_per_token_scores_stay_on_the_device_and_per_sample_vectors_on_the_cpu(tiny, tmp_path, monkeypatch,
                                                                              minibatches):
    """The KL in the reward meets the per-token scores (on the model's device) and the rewards (on
    the CPU): the penalty must cross to the CPU, and the advantages and weights stay there."""
    real_score, real_update, seen = sdpg.score_tokens, sdpg.update_policy, []
    monkeypatch.setattr(sdpg, "score_tokens", lambda *a: [t.as_subclass(OnDevice) for t in real_score(*a)])

    def update(model, optimizer, rollouts, *args):
        old = rollouts.old_logp and rollouts.old_logp[0]
        seen.append([type(t) for t in (rollouts.advantages, rollouts.kl_weight, rollouts.ref_logp[0], old)])
        return real_update(model, optimizer, rollouts, *args)
    monkeypatch.setattr(sdpg, "update_policy", update)
    sdpg.main(run_args(tiny, tmp_path, "--kl-reward", "0.5", "--ppo-minibatches", minibatches))
    old = OnDevice if minibatches == "2" else type(None)
    assert seen == [[torch.Tensor, torch.Tensor, OnDevice, old]] * 2
    assert all(math.isfinite(r["kl_penalty"]) for r in read_metrics(tmp_path)[1:])


def test_tokenizer_without_pad_token_uses_eos(tiny, tmp_path, monkeypatch):
    import transformers
    assert make_tokenizer(pad=False).pad_token is None
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: make_tokenizer(pad=False))
    sdpg.main(run_args(tiny, tmp_path / "out", "--total-steps", "1"))
    assert finite_row(read_metrics(tmp_path / "out")[-1])


def test_non_finite_update_is_skipped_and_repeats_abort(tiny, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    before = [p.detach().clone() for p in model.parameters()]
    rollouts = injected_rollouts(tiny["model"])
    rollouts.ref_logp[3][0] = float("nan")
    cfg = sdpg.Config(ppo_minibatches=1)
    sums = sdpg.update_policy(model, torch.optim.AdamW(model.parameters(), lr=1e-2), rollouts, cfg, 0)
    assert sums["skipped"] == 1 and sums["steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights untouched
    nan_loss = lambda logp, *a: logp * float("nan")
    monkeypatch.setattr(sdpg, "sampled_token_loss", nan_loss)
    with pytest.raises(SystemExit) as exit:
        sdpg.main(run_args(tiny, tmp_path / "nan", "--total-steps", "5", "--max-bad-steps", "2"))
    assert exit.value.code == 2 and "2 updates in a row" in capsys.readouterr().err
    assert [r["skipped_updates"] for r in read_metrics(tmp_path / "nan")[1:]] == [8.0]  # 8 mini-batches


def write_json(path, rows):
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    return str(path)


def softcapped_model(tmp):
    from transformers import AutoConfig
    path = make_model_dir(tmp / "softcapped")
    config = AutoConfig.from_pretrained(path)
    config.final_logit_softcapping = 30.0  # as Gemma 2 has: logits are not h @ W.T
    config.save_pretrained(path)
    return path


def test_refuses_a_logit_scale_or_an_lm_head_bias(tiny):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    sdpg.check_plain_head(model)  # a plain head passes
    model.config.logit_scale = 0.0625  # Cohere's
    with pytest.raises(sdpg.UserError, match="a logit scale"):
        sdpg.check_plain_head(model)
    model.config.logit_scale = 1.0
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    with pytest.raises(sdpg.UserError, match="an lm_head bias"):
        sdpg.check_plain_head(model)


def bad_inputs(tiny, tmp):
    return {
        "unknown task": (["--task", "mathqa"], "unknown task"),
        "missing file": (["--task", str(tmp / "missing.jsonl")], "does not exist"),
        "missing fields": (["--task", write_json(tmp / "f.jsonl", [{"question": "1+1?"}])],
                           "row 1 has neither"),
        "unparseable reference": (["--task", write_json(tmp / "r.jsonl", [{"question": "1+1?", "answer": "2"},
                                                                         {"question": "?",
                                                                          "answer": " . "}])],
                                  "row 2 has a reference answer that cannot be parsed"),
        "bad answer format": (["--answer-format", "latex"], "answer-format"),
        "softcapped logits": (["--model", softcapped_model(tmp)], "final-logit softcapping"),
        "empty data": (["--task", write_json(tmp / "e.jsonl", [])], "no problems"),
        "bad model path": (["--model", str(tmp / "no-model")], "does not exist"),
        "prompts too long": (["--max-prompt-tokens", "10"], "no usable training problems"),
        "bad kl mode": (["--kl-mode", "xkl"], "kl-mode"),
        "more mini-batches than samples": (["--ppo-minibatches", "17"],
                                           "--ppo-minibatches 17 exceeds the --batch-size x --group-size"),
        "temperature 0": (["--temperature", "0"], "--temperature 0.0: must be > 0"),
        "negative temperature": (["--temperature", "-1"], "--temperature -1.0: must be > 0"),
        "no response tokens": (["--max-response-tokens", "0"], "--max-response-tokens 0: must be >= 1"),
        "negative lr": (["--lr", "-0.001"], "--lr -0.001: must be >= 0"),
        "nan lr": (["--lr", "nan"], "--lr nan: must be >= 0"),
        "negative alpha": (["--alpha", "-1"], "--alpha -1.0: must be >= 0"),
        "negative beta": (["--beta", "-0.5"], "--beta -0.5: must be >= 0"),
        "negative eval-n": (["--eval-n", "-2"], "--eval-n -2: must be >= 0"),
        "eps-low above 1": (["--eps-low", "1.5"], "--eps-low 1.5: must be >= 0 and <= 1"),
        "no head memory": (["--head-memory-mb", "0"], "--head-memory-mb 0: must be >= 1"),
        "no sample memory": (["--sample-memory-mb", "0"], "--sample-memory-mb 0.0: must be > 0"),
        "batch size 0": (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        "default mini-batches, small run": (["--batch-size", "1", "--group-size", "2"],
                                            "--ppo-minibatches 8 exceeds the --batch-size x --group-size"),
        "one checkpoint kept": (["--keep-checkpoints", "1"], "--keep-checkpoints 1: use 0 (all) or at least"),
        "unknown tracker": (["--report-to", "tensorboard"], "unknown --report-to 'tensorboard'"),
        "unknown flag": (["--learning-rate", "1"], "unrecognized arguments: --learning-rate"),
        "flag of the wrong type": (["--total-steps", "two"], "argument --total-steps: invalid int value"),
        "bad JSONL line": (["--task", write_text(tmp / "b.jsonl", '{"question": "2?", "answer": "2"}\n\n{')],
                           "b.jsonl: JSONDecodeError: Expecting property name enclosed in double quotes: line 3"),
        "JSON object": (["--task", write_text(tmp / "o.json", '{"question": "1+1?", "answer": "2"}')],
                        "holds a JSON dict, not a list of problems"),
        "model is a file": (["--model", tiny["data"]], "is not a model directory"),
        "empty model folder": (["--model", str(tmp / "empty-model")], "is not a model directory"),
        "model without tokenizer": (["--model", weights_only_model(tiny, tmp)],  # 5.x loads it empty
                                    ("ids) is empty or exceeds", "cannot load AutoTokenizer")),
    }


def write_text(path, text):
    path.write_text(text)
    return str(path)


def weights_only_model(tiny, tmp):
    """The tiny model's config and weights, without tokenizer files."""
    path = tmp / "weights-only"
    path.mkdir()
    for name in os.listdir(tiny["model"]):
        if name.startswith(("config", "model", "generation")):
            shutil.copy(os.path.join(tiny["model"], name), path)
    return str(path)


def test_old_installs_are_refused_with_the_version_needed(monkeypatch):
    import transformers
    monkeypatch.setattr(transformers, "__version__", "4.55.4")
    with pytest.raises(sdpg.UserError, match="transformers 4.55.4 is too old: .* needs transformers >= 4.56"):
        sdpg.check_flags(sdpg.Config(), 1)
    monkeypatch.setattr(transformers, "__version__", "4.56.0")
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    with pytest.raises(sdpg.UserError, match=r"torch 2\.9\.1\+cu128 is too old: .* needs torch >= 2\.10"):
        sdpg.check_flags(sdpg.Config(), 1)
    monkeypatch.setattr(torch, "__version__", "2.10.0+cpu")
    sdpg.check_flags(sdpg.Config(), 1)  # the floors themselves pass


def test_bad_inputs_give_one_line_and_no_output(tiny, tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    for name, (args, message) in bad_inputs(tiny, tmp_path).items():
        out = tmp_path / name.replace(" ", "-")
        with pytest.raises(SystemExit) as exit:
            sdpg.main(run_args(tiny, out) + args)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        messages = message if isinstance(message, tuple) else (message,)
        assert exit.value.code == 2 and len(err) == 1 and any(m in err[0] for m in messages), (name, err)
        assert not out.exists(), name


def test_a_failed_hub_load_names_hf_hub_offline(tiny, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sdpg.py"),
                           *run_args(tiny, tmp_path / "o", "--model", "Qwen2.5-0.5B")],
                          capture_output=True, text=True, timeout=120, env=env)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: cannot load AutoTokenizer from 'Qwen/Qwen2.5")
    assert "HF_HUB_OFFLINE=1" in last and not (tmp_path / "o").exists()


def test_bad_input_subprocess_has_no_traceback(tiny, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sdpg.py"),
                           *run_args(tiny, tmp_path / "o", "--task", str(tmp_path / "missing.jsonl"))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data file")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------
# DDP on CPU: gloo, two processes
# ------------------------------------------------------------------------------------------
def injected_rollouts(model_dir, seed=0):
    """A fixed batch of 4 groups x 2 samples, with teacher prompts, advantages, gates and
    reference log-probs, as one training step would hand to update_policy."""
    g = torch.Generator().manual_seed(seed)
    tok = make_tokenizer()
    path = os.path.join(model_dir, "..", f"ddp-{os.getpid()}.jsonl")  # one file a process: ranks run at once
    problems = sdpg.load_problems(write_problems(path), "train")
    built = sdpg.build_prompts(tok, problems[:4], 4096, with_teacher=True)
    group = [p for p in built for _ in range(2)]
    responses = [torch.randint(1, 60, (int(n),), generator=g).tolist()
                 for n in torch.randint(1, 9, (8,), generator=g)]
    advantages = torch.tensor([1.0, -1.0, 0.7, -0.7, 0.0, 0.0, -1.0, 1.0])
    return sdpg.Rollouts([p["student_ids"] for p in group], [p["teacher_ids"] for p in group], responses,
                         advantages, 0.5 * (advantages > 0).float(),
                         ref_logp=[-torch.rand(len(r), generator=g) * 4 for r in responses])


def one_update(model_dir, indices):
    """One optimizer step (SGD, so the step is the gradient itself) on the samples `indices`, in
    float64: the two runs differ only in the order of their sums, so 1e-9 is a real bound."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = injected_rollouts(model_dir)
    pick = lambda xs: [xs[i] for i in indices]
    rollouts = sdpg.Rollouts(pick(full.student_ids), pick(full.teacher_ids), pick(full.response_ids),
                             full.advantages[indices], full.kl_weight[indices], ref_logp=pick(full.ref_logp))
    # one sample per micro-batch: the same shapes in both runs, only the order of the sums differs
    cfg = sdpg.Config(micro_batch_tokens=1, grad_clip=1e9, alpha=0.1, ppo_minibatches=1)
    sdpg.update_policy(model, torch.optim.SGD(model.parameters(), lr=1.0), rollouts, cfg, 0)
    return {k: v - before[k] for k, v in model.state_dict().items()}


def ddp_worker(rank, world, store, model_dir, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        delta = one_update(model_dir,
                           list(range(rank * 2, 8, world * 2)) + list(range(rank * 2 + 1, 8, world * 2)))
        if rank == 0:
            torch.save(delta, out)
    finally:
        dist.destroy_process_group()


def test_ddp_update_equals_single_process(tiny, tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM
    single = one_update(tiny["model"], list(range(8)))
    out = tmp_path / "ddp_delta.pt"
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "store"), tiny["model"], str(out)), nprocs=2)
    ddp = torch.load(out)
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])
    assert single.keys() == ddp.keys() and rel(flat(ddp), flat(single)) < 1e-9  # the update itself
    start = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float64).state_dict()
    for k in single:  # the parameters after the step
        assert rel(start[k] + ddp[k], start[k] + single[k]) < 1e-9, k
    # the check can fail: one rank's half of the batch alone gives another update
    assert rel(flat(one_update(tiny["model"], [0, 1, 4, 5])), flat(single)) > 0.1


def step_inputs(ranks):
    """One step's local sums and samples on each of `ranks` ranks: per-token and per-sample counts
    differ by rank, while the update's loss, grad norm and update counts are global (the same)."""
    out = []
    for rank in ranks:
        sums = dict(tokens=8.0 + rank, kl=0.5 * rank, teacher_tokens=2.0 + rank, ref_kl=0.1,
                    entropy=3.0 + rank, clipped=rank, approx_kl=0.01, loss=0.7, grad_norm=1.5, steps=1.0,
                    skipped=1.0, rlsd_tokens=2.0 + rank, rlsd_delta=-0.5 + rank, rlsd_weight=1.9 + rank,
                    rlsd_clipped=rank)
        rewards, penalty = torch.tensor([1.0, 2.0 * rank - 1]), torch.tensor([0.25, rank / 2])
        out.append((sums, rewards, penalty, torch.tensor([1.0, 0.0]), [[5] * (3 + 4 * rank), [5] * 5],
                    [False, rank == 1]))
    return out


def metrics_worker(rank, world, store, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cfg = sdpg.Config(group_size=2, kl_reward=1.0)
        torch.save(sdpg.step_metrics(*step_inputs([0, 1])[rank], cfg, torch.device("cpu")), f"{out}{rank}")
    finally:
        dist.destroy_process_group()


def test_step_metrics_over_two_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(metrics_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "m")), nprocs=2)
    ranks = [torch.load(tmp_path / f"m{rank}") for rank in (0, 1)]
    parts = step_inputs([0, 1])
    summed = {k: v if k in ("loss", "grad_norm", "steps", "skipped") else sum(p[0][k] for p in parts)
              for k, v in parts[0][0].items()}
    (_, *mine), (_, *other) = parts
    joined = [torch.cat([a, b]) if torch.is_tensor(a) else a + b for a, b in zip(mine, other)]
    single = sdpg.step_metrics(summed, *joined, sdpg.Config(group_size=2, kl_reward=1.0), torch.device("cpu"))
    # the compile counters are this process's own, and earlier tests may have compiled in it
    plain = lambda m: {k: v for k, v in m.items() if k not in ("decode_compiles", "cudagraph_skips")}
    assert plain(ranks[0]) == plain(ranks[1]) == plain(single)
    assert single["skipped_updates"] == 1 and single["response_len_max"] == 7 and single["reward"] == 0.5
    assert single["kl_penalty"] == 0.25 and single["zero_spread_frac"] == 0.5
    assert single["correct_frac"] == 0.75  # +1, -1 and +1, +1
    assert single["rlsd_delta"] == 0.0 and single["rlsd_weight"] == pytest.approx(4.8 / 5)
    assert single["rlsd_clip_frac"] == pytest.approx(1 / 5)  # over the tokens RLSD scored, on all ranks


def test_a_group_of_one_is_never_flat_and_rlsd_metrics_only_where_it_ran():
    sums, rewards, *rest = step_inputs([1])[0]  # rewards (+1, +1)
    cpu = torch.device("cpu")
    metrics = lambda g, s: sdpg.step_metrics(s, rewards, *rest, sdpg.Config(group_size=g), cpu)
    assert metrics(2, sums)["zero_spread_frac"] == 1.0 and metrics(1, sums)["zero_spread_frac"] == 0.0
    no_rlsd = {k: v for k, v in sums.items() if not k.startswith("rlsd")}
    assert metrics(2, sums)["rlsd_delta"] == 0.5 / 3 and metrics(2, no_rlsd)["rlsd_delta"] is None


def zero_worker(rank, world, store, model_dir, out_dir):
    """Two AdamW steps with the optimizer state sharded over 2 ranks (ZeRO-1), then a checkpoint."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
        cfg = sdpg.Config(micro_batch_tokens=1, alpha=0.1, ppo_minibatches=2, lr=1e-2, out_dir=out_dir)
        optimizer = sdpg.optimizer_and_resume(cfg, model)[0]
        assert type(optimizer).__name__ == "ZeroRedundancyOptimizer"
        full = injected_rollouts(model_dir)
        idx = [rank * 2, rank * 2 + 4, rank * 2 + 1, rank * 2 + 5]  # mini-batches {0,4,2,6}, {1,5,3,7}
        pick = lambda xs: [xs[i] for i in idx]
        rollouts = sdpg.Rollouts(pick(full.student_ids), pick(full.teacher_ids), pick(full.response_ids),
                                 full.advantages[idx], full.kl_weight[idx], ref_logp=pick(full.ref_logp))
        sums = sdpg.update_policy(model, optimizer, rollouts, cfg, 0)
        assert sums["steps"] == 2
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        sdpg.save_checkpoint(cfg, 1, model, make_tokenizer(), optimizer, scheduler, 0)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(out_dir, "live.pt"))
    finally:
        dist.destroy_process_group()


def test_zero1_adamw_equals_single_process_and_checkpoints(tiny, tmp_path):
    # in float64: AdamW at lr 1e-2 amplifies fp32 rounding that differs with the reduction order
    # (2e-6 to 9e-6 per tensor on some CPUs), while fp64 rounding stays far below AdamW's eps
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float64)
    cfg = sdpg.Config(micro_batch_tokens=1, alpha=0.1, ppo_minibatches=2, lr=1e-2)
    full = injected_rollouts(tiny["model"])
    order = [0, 4, 2, 6, 1, 5, 3, 7]
    pick = lambda xs: [xs[i] for i in order]
    rollouts = sdpg.Rollouts(pick(full.student_ids), pick(full.teacher_ids), pick(full.response_ids),
                             full.advantages[order], full.kl_weight[order], ref_logp=pick(full.ref_logp))
    optimizer = sdpg.optimizer_and_resume(cfg, model)[0]
    sdpg.update_policy(model, optimizer, rollouts, cfg, 0)
    mp.spawn(zero_worker, args=(2, str(tmp_path / "store"), tiny["model"], str(tmp_path)), nprocs=2)
    live = torch.load(tmp_path / "live.pt")
    start = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float64).state_dict()
    single = model.state_dict()
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])
    assert rel(flat(live), flat(single)) < 1e-9 and rel(flat(single), flat(start)) > 1e-3  # moved, and alike
    assert all(rel(live[k], single[k]) < 1e-9 for k in single)  # per tensor too
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-1", dtype=torch.float64)
    assert all(torch.equal(saved.state_dict()[k], live[k]) for k in live)
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()  # still tied
    state = torch.load(tmp_path / "checkpoint-1" / "trainer_state.pt")["optimizer"]  # weights_only, as resume
    want = optimizer.state_dict()["state"]
    assert len(state["state"]) == len(want) == len(list(model.parameters()))  # every shard, consolidated
    for i in want:
        assert rel(state["state"][i]["exp_avg_sq"], want[i]["exp_avg_sq"]) < 1e-9


def torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "sdpg.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_torchrun_two_processes_and_sharded_resume(tiny, tmp_path):
    from safetensors.torch import load_file
    full, resumed = tmp_path / "ddp-run", tmp_path / "ddp-resumed"
    extra = ["--total-steps", "4", "--save-every", "2", "--ppo-minibatches", "2"]
    torchrun(run_args(tiny, full) + extra)
    rows = read_metrics(full)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and all(finite_row(r) for r in rows)
    assert sorted(os.listdir(full)) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl"]
    torchrun(run_args(tiny, resumed) + extra + ["--resume", str(full / "checkpoint-2")])
    timing = lambda r: {k: v for k, v in r.items() if not k.endswith("_s") and k != "tokens_per_s"}
    assert [timing(r) for r in rows[-2:]] == [timing(r) for r in read_metrics(resumed)]
    a, b = (load_file(d / "checkpoint-4" / "model.safetensors") for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                left += [pid] if str(tmp_path).encode() in f.read() else []
        except OSError:
            pass
    assert not left  # no process left behind


# ------------------------------------------------------------------------------------------
# Benchmark (not a test): python test_sdpg.py --bench
# ------------------------------------------------------------------------------------------
def naive_head(hs, ht, w, tokens, adv, kl_w, ref, n_tokens):
    """The (tokens x vocab) way: bf16 GEMM, fp32 logits kept for autograd, teacher logits too."""
    logp_all = (hs @ w.T).float().log_softmax(-1)
    with torch.no_grad():
        logq_all = (ht @ w.T).float().log_softmax(-1)
    kl = (logp_all.exp() * (logp_all - logq_all)).sum(-1)
    logp = logp_all.gather(1, tokens[:, None]).squeeze(1)
    loss = sdpg.sampled_token_loss(logp, None, ref, adv, 1e-3, "urkl", 0.2, 0.28, 10.0) + kl_w * kl
    return loss.sum() / n_tokens


def reference_grads(hs, ht, w, tokens, adv, kl_w, ref, n_tokens, chunk=2048):
    """fp32 gradients of the naive loss, accumulated chunk by chunk (the loss is a sum over tokens)."""
    w32 = w.float().requires_grad_()
    gh = torch.empty(hs.shape, dtype=torch.float32, device=hs.device)
    for s in range(0, len(tokens), chunk):
        h = hs[s:s + chunk].float().requires_grad_()
        sl = slice(s, s + chunk)
        naive_head(h, ht[sl].float(), w32, tokens[sl], adv[sl], kl_w[sl], ref[sl], n_tokens).backward()
        gh[sl] = h.grad
    return gh, w32.grad


def bench(sizes, h, v, dtype, device, repeats=5, memory_mb=2048):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, H={h}, V={v}, {dtype}, "
          f"torch {torch.__version__}, head budget {memory_mb} MB")
    print(f"{'N':>7} {'method':>6} {'ms':>9} {'extra peak MB':>14} {'rel err dX':>11} {'rel err dW':>11}")
    for n in sizes:
        g = torch.Generator(device=device).manual_seed(0)
        hs = torch.randn(n, h, device=device, dtype=dtype, generator=g)
        ht = hs + 0.3 * torch.randn(n, h, device=device, dtype=dtype, generator=g)
        w = (torch.randn(v, h, device=device, dtype=dtype, generator=g) * h ** -0.5)
        tokens = torch.randint(0, v, (n,), device=device, generator=g)
        adv = torch.randn(n, device=device, generator=g)
        kl_w = (adv > 0).float() * 1e-3
        ref = -torch.rand(n, device=device, generator=g) * 5
        want_h, want_w = reference_grads(hs, ht, w, tokens, adv, kl_w, ref, float(n))
        for name in ("naive", "fused"):
            def step():
                a_h, a_w = hs.detach().requires_grad_(), w.detach().requires_grad_()
                if name == "naive":
                    loss = naive_head(a_h, ht, a_w, tokens, adv, kl_w, ref, float(n))
                else:
                    loss, _ = sdpg.sdpg_head_loss(a_h, ht, a_w, tokens, adv, kl_w, None, ref, float(n),
                                                  memory_mb=memory_mb)
                loss.backward()
                return a_h.grad, a_w.grad
            try:
                if device == "cuda":
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                gh, gw = step()
                sync()
                peak = ((torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda"
                        else float("nan"))
                err_h, err_w = rel(gh, want_h), rel(gw, want_w)
                del gh, gw
                import time
                times = []
                for _ in range(repeats):
                    sync()
                    t0 = time.perf_counter()
                    step()
                    sync()
                    times.append(time.perf_counter() - t0)
                ms = 1000 * sorted(times)[len(times) // 2]
                print(f"{n:>7} {name:>6} {ms:>9.1f} {peak:>14.0f} {err_h:>11.2e} {err_w:>11.2e}")
            except torch.OutOfMemoryError:
                print(f"{n:>7} {name:>6} {'OOM':>9}")
                torch.cuda.empty_cache()
    print(f"head chunk: {next(sdpg.head_chunks(10**9, v, memory_mb))[1]} rows (compiled: "
          f"{sdpg.fused_logit_stats.compiled_ran and sdpg.fused_logit_grad.compiled_ran})")


# ------------------------------------------------------------------------------------------
# Sampler benchmark (not a test): python test_sdpg.py --bench-sample
# ------------------------------------------------------------------------------------------
def timed(fn, device):
    """(seconds, fn()), the device synchronised on both sides."""
    import time
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def bench_sampler(config, rows, prompt_len, new_tokens, device, save_to=None):
    """Tokens/s of model.generate (dynamic cache; on CUDA also static cache, auto-compiled) and of
    sdpg.generate, sampling at temperature 1 from random weights, each timed after one warm-up call.
    With save_to, the fp32 model and a tokenizer are written there for sdpg.main."""
    import copy
    import transformers
    from transformers import Qwen2ForCausalLM
    cuda = device == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).eval()  # fp32 master weights, as train() loads them
    sampler = sdpg.sampling_policy(model)  # CUDA: bf16 copy + decode attention; CPU: the model
    hf = model
    if cuda:  # bf16 weights, fp32 rotary buffers: as from_pretrained(dtype=bf16)
        hf = copy.deepcopy(model)
        for p in hf.parameters():
            p.data = p.data.to(torch.bfloat16)
    prompts = torch.randint(0, config.vocab_size, (rows, prompt_len), device=device)
    never = config.vocab_size - 1  # the only stop id: sampled with p ~ 1/V, so rows run to the end
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=new_tokens,
                    max_new_tokens=new_tokens, eos_token_id=never, pad_token_id=0)

    def hf_generate(**extra):
        return lambda: rows * (hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                           **sampling, **extra).shape[1] - prompt_len)

    def ours():
        cfg = sdpg.Config(max_response_tokens=new_tokens)
        responses, _ = sdpg.generate(sampler, prompts.tolist(), cfg, 0, [never])
        return sum(map(len, responses))
    methods = [("HF generate, dynamic cache", hf_generate())]
    if cuda:
        methods.append(("HF generate, static cache, compiled", hf_generate(cache_implementation="static")))
    methods.append(("sdpg.generate", ours))
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {'bf16' if cuda else 'fp32'}; H={config.hidden_size}, "
          f"L={config.num_hidden_layers}, V={config.vocab_size}; {rows} rows x {new_tokens} new tokens, "
          f"{prompt_len}-token prompts", flush=True)
    print(f"{'method':<37} {'rows':>5} {'tokens':>8} {'warm-up s':>9} {'s':>7} {'tokens/s':>9} "
          f"{'x dynamic':>9} {'peak GB':>8} {'+GB':>6}   (peak: all weights resident; +: above them)")
    base = None
    for name, fn in methods:
        try:
            warm, _ = timed(fn, device)  # compilation and CUDA-graph capture happen here
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            seconds, tokens = timed(fn, device)
            rate = tokens / seconds
            base = base or rate
            peak = (f"{torch.cuda.max_memory_allocated() / 2**30:8.2f} "
                    f"{(torch.cuda.max_memory_allocated() - resident) / 2**30:6.2f}" if cuda
                    else f"{'-':>8} {'-':>6}")
            print(f"{name:<37} {rows:>5} {tokens:>8} {warm:>9.1f} {seconds:>7.2f} {rate:>9.0f} "
                  f"{rate / base:>9.2f} {peak}", flush=True)
        except Exception as e:
            print(f"{name:<37} failed: {type(e).__name__}: {str(e).strip()[:300]}", flush=True)
    consecutive_calls(ours, device)
    if save_to:
        tok = make_tokenizer()
        model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(save_to)
        tok.save_pretrained(save_to)


def consecutive_calls(fn, device, calls=6):
    """Seconds per call, decode-step compilations and CUDA graphs recorded over consecutive calls
    of the same shape: after the first, the time stays flat and neither count grows."""
    from torch._inductor import cudagraph_trees
    recorded = []
    record = cudagraph_trees.CUDAGraphTreeManager.record_function
    counted = lambda *a, **k: recorded.append(1) or record(*a, **k)
    cudagraph_trees.CUDAGraphTreeManager.record_function = counted
    try:
        print(f"\n{calls} consecutive sdpg.generate calls of one shape:\n"
              f"{'call':>4} {'s':>7} {'decode_compiles':>15} {'cudagraphs_recorded':>19} "
              f"{'cudagraph_skips':>15}")
        for call in range(1, calls + 1):
            seconds, _ = timed(fn, device)
            print(f"{call:>4} {seconds:>7.2f} {sdpg.COMPILES['decode_step']:>15} {len(recorded):>19} "
                  f"{torch._dynamo.utils.counters['inductor']['cudagraph_skips']:>15}", flush=True)
    finally:
        cudagraph_trees.CUDAGraphTreeManager.record_function = record


def release():
    """Free what a finished benchmark held: compiled code, CUDA graphs and their memory pools."""
    import gc
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_sdpg_steps(model_dir, root, steps=(2, 3)):
    """sdpg.main for 3 steps at the default flags (responses capped at 256 tokens): SDPG, plain GRPO
    (--beta 0 --alpha 0) and Table 1's GRPO and RLSD commands, on the saved random model: the phases of steps
    2 and 3, and the KL penalty of step 1 (0 exactly while pi_old = pi_ref)."""
    fields = dict(sample_s=".2f", verify_s=".2f", ref_s=".2f", teacher_s=".2f", update_s=".2f", step_s=".2f",
                  peak_gpu_gb=".1f", teacher_tokens=".0f", response_len=".1f", kl_penalty=".2e")
    args = ["--model", model_dir, "--task", write_problems(os.path.join(root, "problems.jsonl")),
            "--max-response-tokens", "256", "--eval-n", "8", "--eval-every", "0", "--save-every", "0",
            "--total-steps", "3"]
    print("\nrandom weights: rewards ~-1, so at the default flags (gate on) the teacher sees few samples")
    step_s = {}
    table1 = ["--beta", "0", "--alpha", "0", "--kl-reward", "1e-3", "--eps-high", "0.2", "--clip-c", "1000"]
    for name, extra in (("sdpg", []), ("grpo", ["--beta", "0", "--alpha", "0"]), ("table1-grpo", table1),
                        ("table1-rlsd", readme_rlsd_flags())):
        out = os.path.join(root, name)
        default = sdpg.Config()
        print(f"\n{name}: sdpg.main: --model <random, saved> --task <write_problems jsonl> "
              f"{' '.join(args[4:] + extra)} (default --batch-size {default.batch_size} "
              f"--group-size {default.group_size})", flush=True)
        try:
            sdpg.main(args + extra + ["--out-dir", out])
            rows = [r for r in read_metrics(out) if r["step"] in steps]
            first = [r for r in read_metrics(out) if r["step"] == 1][0]
            print(f"step 1: kl_penalty {first['kl_penalty']}, ref_kl {first['ref_kl']}")
        except (Exception, SystemExit) as e:
            print(f"{name} failed: {type(e).__name__}: {str(e).strip()[:300]}", flush=True)
            continue
        finally:
            shutil.rmtree(out, ignore_errors=True)  # checkpoint-3: weights and AdamW state
            release()  # each run compiles and captures its own graphs
        print(f"{'step':>4} " + " ".join(f"{f:>{len(f)}}" for f in fields) + " sample_s/step_s")
        for r in rows:
            print(f"{r['step']:>4} " + " ".join(f"{'-' if r.get(f) is None else format(r[f], fmt):>{len(f)}}"
                                                for f, fmt in fields.items())
                  + f" {r['sample_s'] / r['step_s']:>15.1%}", flush=True)
        step_s[name] = sum(r["step_s"] for r in rows) / max(1, len(rows))
    if {"sdpg", "grpo"} <= set(step_s):
        print(f"\nSDPG step_s / GRPO (beta 0, alpha 0) step_s, mean of steps {steps}: "
              f"{step_s['sdpg'] / step_s['grpo']:.2f}")
    return step_s


QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
README_FLAGS_1_7B = ["--grad-checkpointing", "--sample-memory-mb", "16000"]  # README: memory


def bench_memory(root, shape=QWEN3_1_7B, flags=README_FLAGS_1_7B, extra=()):
    """One SDPG step (default flags: 128 prompts x 8 samples, 512 new tokens) of a random model of
    the given shape at the README's suggested flags, then an evaluation of 64 problems at mean@4:
    the peak memory of each phase, each measured from a reset of the peak."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    tok = make_tokenizer()
    config = Qwen3Config(**shape, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(os.path.join(root, "model"))
    tok.save_pretrained(os.path.join(root, "model"))
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    del model
    release()
    peaks, originals = {}, {}

    def phase(name):
        def measured(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            try:
                return (originals[name] if name != "save_checkpoint" else lambda *a: None)(*args, **kwargs)
            finally:
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
                peaks[name] = max(peaks.get(name, 0.0), peak) if cuda else peak
        return measured
    # save_checkpoint does nothing here: 27 GB of weights and AdamW state are not what we measure
    for name in ("generate", "score_tokens", "update_policy", "evaluate", "save_checkpoint"):
        originals[name] = getattr(sdpg, name)
        setattr(sdpg, name, phase(name))
    problems = write_problems(os.path.join(root, "p.jsonl"), n=64)
    args = ["--model", os.path.join(root, "model"), "--task", problems,
            "--total-steps", "1", "--eval-every", "0", "--eval-samples", "4", *flags, *extra,
            "--out-dir", os.path.join(root, "out")]
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; sdpg.main {' '.join(args[2:])}; "
          f"{billions:.2f}B parameters", flush=True)
    try:
        sdpg.main(args)
    finally:
        for name, fn in originals.items():
            setattr(sdpg, name, fn)
    row = read_metrics(os.path.join(root, "out"))[-1]
    print(f"{'phase':<14} {'peak GB':>8}")
    for name, label in (("generate", "sample"), ("score_tokens", "ref/old scores"),
                        ("update_policy", "update"), ("evaluate", "evaluate")):
        print(f"{label:<14} {peaks.get(name, float('nan')):>8.1f}")
    print(f"step_s {row['step_s']:.1f}, sample_s {row['sample_s']:.1f}, update_s {row['update_s']:.1f}, "
          f"response_len {row['response_len']:.0f}, decode_compiles {row['decode_compiles']}")
    return peaks


# ------------------------------------------------------------------------------------------
# The evidence rows (not a test): python test_sdpg.py --make-rows DIR
# ------------------------------------------------------------------------------------------
# Small arithmetic word problems as verl rows (--answer-format hash), calibrated so that
# SmolLM2-135M-Instruct solves about 1 in 8 at T = 1 and its hinted teacher is clearly ahead. The
# chat: two worked examples of the same kind as earlier turns, then the question. Every user turn
# ends with the marker and a hint (the worked steps and the answer): the student sees no hint, the
# teacher sees all of them, the examples' included, which shows in context how a hint is used.
EVIDENCE_NAMES = [("Ana", "She"), ("Ben", "He"), ("Carla", "She"), ("Dev", "He"), ("Eva", "She"),
                  ("Farid", "He"), ("Gina", "She"), ("Hugo", "He"), ("Iris", "She"), ("Jonas", "He")]
EVIDENCE_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "stamps", "shells", "cards"]


def evidence_problem(rng, kind):
    """(question, worked steps, answer) of one random problem of the given kind."""
    (name, he), item = rng.choice(EVIDENCE_NAMES), rng.choice(EVIDENCE_ITEMS)
    if kind == "buy":          # one step: a + b
        a, b = rng.randint(11, 59), rng.randint(11, 39)
        q = f"{name} has {a} {item}. {he} buys {b} more. How many {item} does {name} have now?"
        return q, f"{a} + {b} = {a + b}.", a + b
    if kind == "buy_give":     # two steps: a + b - c, two-digit numbers
        a, b = rng.randint(11, 39), rng.randint(5, 19)
    else:                      # "buy_give_small": a + b - c, small numbers
        a, b = rng.randint(5, 20), rng.randint(2, 9)
    c = rng.randint(3 if kind == "buy_give" else 2, a + b - 3)
    q = (f"{name} has {a} {item}. {he} buys {b} more and then gives away {c}. "
         f"How many {item} does {name} have now?")
    return q, f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.", a + b - c


def evidence_user_turn(question, steps, answer):
    return (f"{question}\nEnd your answer with #### N.{sdpg.TEACHER_CONTEXT}\n[Hint] {steps} "
            f"The correct answer is {answer}.")


def evidence_row(rng, seen):
    """One verl row whose question is new (not in `seen`), after two worked examples."""
    kind = rng.choice(["buy", "buy_give", "buy_give_small"])
    while (p := evidence_problem(rng, kind))[0] in seen:
        pass
    seen.add(p[0])
    chat = []
    for _ in range(2):
        ex = evidence_problem(rng, kind)
        chat += [dict(role="user", content=evidence_user_turn(*ex)),
                 dict(role="assistant", content=f"{ex[1]}\n#### {ex[2]}")]
    chat.append(dict(role="user", content=evidence_user_turn(*p)))
    return dict(prompt=chat, reward_model=dict(ground_truth=str(p[2])))


def make_rows(directory, seed=0, n_train=200, n_heldout=100):
    """DIR/train.jsonl and DIR/heldout.jsonl, whose questions are disjoint."""
    import random
    rng, seen = random.Random(seed), set()
    os.makedirs(directory, exist_ok=True)
    for name, n in (("train.jsonl", n_train), ("heldout.jsonl", n_heldout)):
        with open(os.path.join(directory, name), "w") as f:
            f.writelines(json.dumps(evidence_row(rng, seen)) + "\n" for _ in range(n))
        print(f"wrote {n} rows to {os.path.join(directory, name)}")


def test_evidence_rows_are_disjoint_and_hide_the_hint(tmp_path):
    make_rows(tmp_path)
    sets = [sdpg.load_problems(str(tmp_path / name), "train") for name in ("train.jsonl", "heldout.jsonl")]
    assert [len(rows) for rows in sets] == [200, 100]
    question = lambda p: p["messages"][-1]["content"].split("\n")[0]
    train, heldout = ({question(p) for p in rows} for rows in sets)
    assert len(train) == 200 and len(heldout) == 100 and not train & heldout
    student, teacher = sdpg.split_context(sets[0][0]["messages"], "hash")
    assert [m["content"].count("[Hint]") for m in student + teacher] == [0] * 5 + [1, 0, 1, 0, 1]
    assert sdpg.reward(teacher[1]["content"], sets[0][0]["messages"][1]["content"], "hash") == 1.0


def bench_head(memory_mb):
    if torch.cuda.is_available():
        bench([8192, 32768], 896, 151936, torch.bfloat16, "cuda", memory_mb=memory_mb)
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        bench([512, 2048], 64, 8192, torch.float32, "cpu", repeats=2)


def bench_memory_here():
    import tempfile
    with tempfile.TemporaryDirectory() as root:
        if torch.cuda.is_available():
            bench_memory(root)
        else:  # the same plumbing on a small shape (no peaks on the CPU)
            bench_memory(root, dict(QWEN3_1_7B, vocab_size=512, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16), extra=["--batch-size", "4", "--max-response-tokens", "8",
                                                         "--eval-n", "4", "--device", "cpu"])


def bench_sample_here():
    import tempfile
    from transformers import Qwen2Config
    if torch.cuda.is_available():  # Qwen2.5-0.5B's shape, random weights
        config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                             rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
        with tempfile.TemporaryDirectory() as root:
            bench_sampler(config, 512, 128, 256, "cuda", save_to=os.path.join(root, "model"))
            release()
            bench_sdpg_steps(os.path.join(root, "model"), root)
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        config = Qwen2Config(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             tie_word_embeddings=True)
        bench_sampler(config, 64, 32, 64, "cpu")


def main(argv=None):
    """`python test_sdpg.py --bench | --bench-sample | --bench-memory | --make-rows DIR` (not tests)."""
    import argparse
    parser = argparse.ArgumentParser(description="Benchmarks of sdpg.py, and the README's evidence rows; "
                                                 "the tests: python -m pytest -q test_sdpg.py")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--bench", action="store_true", help="the fused head against the naive one")
    what.add_argument("--bench-sample", action="store_true", help="the decode loop, then SDPG and GRPO steps")
    what.add_argument("--bench-memory", action="store_true", help="per-phase memory peaks (Qwen3-1.7B)")
    what.add_argument("--make-rows", metavar="DIR", help="write the evidence rows into the directory DIR")
    parser.add_argument("--memory-mb", type=int, default=2048, help="--bench: the head's memory budget")
    args = parser.parse_args(argv)
    if args.make_rows and not os.path.isdir(args.make_rows):
        parser.error(f"--make-rows: {args.make_rows!r} is not a directory")
    if args.bench:
        bench_head(args.memory_mb)
    elif args.bench_memory:
        bench_memory_here()
    elif args.bench_sample:
        bench_sample_here()
    else:
        make_rows(args.make_rows)


def test_benchmark_flags_are_checked(tmp_path, capsys):
    for argv, message in (([], "one of the arguments"), (["--bench", "--rep", "3"], "unrecognized arguments"),
                          (["--make-rows", str(tmp_path / "missing")], "is not a directory"),
                          (["--bench", "--memory-mb", "lots"], "invalid int value")):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2 and message in capsys.readouterr().err, argv
    main(["--make-rows", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["heldout.jsonl", "train.jsonl"]


if __name__ == "__main__":
    main()
