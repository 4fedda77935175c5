"""
train.py: pretrain a small GPT for a fixed time budget, then print val_bpb and a summary.

This file is the research surface: the loop patches the constants block below (and, in code
mode, an LLM may edit anything else). It runs on an H100, a Colab T4, Apple MPS and a CPU:

    python train.py

The profile of the prepared data (python prepare.py) fixes MAX_SEQ_LEN, TIME_BUDGET, the
validation set and the defaults of the constants. For quick looks and tests:
AUTORESEARCH_TIME_BUDGET=<seconds> shortens the budget, AUTORESEARCH_STEPS=<n> trains exactly n
steps instead (the schedule then runs by steps, so a run is reproducible from SEED).
AUTORESEARCH_DEVICE=cpu|cuda|mps, AUTORESEARCH_DTYPE=bf16|fp16|fp32 and AUTORESEARCH_COMPILE=1|0
override what is chosen for the device (the tests run every GPU code path on a CPU this way).
"""

import time

T_START = time.time()

import gc  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

# Set before torch is imported, so that it and the workers it starts see them. Compiled
# kernels are cached in one lasting place, so a trial reuses what an earlier one compiled
# (BENCHMARKS.md: the seconds this saves); a user's own choice of place wins. Expandable
# segments keep fragmented CUDA memory from failing an allocation that would fit, as in
# Karpathy's train.py.
_COMPILE_CACHE = os.path.join(os.environ.get("AUTORESEARCH_CACHE")
                              or os.path.expanduser("~/.cache/autoresearch"), "compile")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or _COMPILE_CACHE
os.environ["TRITON_CACHE_DIR"] = (os.environ.get("TRITON_CACHE_DIR")
                                  or os.path.join(_COMPILE_CACHE, "triton"))
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from prepare import PrepareError, load_prepared  # noqa: E402

# ---------------------------------------------------------------------------
# Constants: what the loop searches. One literal per line; None takes the profile's default,
# and the loop writes those values in when it starts, so this block shows the recipe that runs.
# ---------------------------------------------------------------------------

ASPECT_RATIO = None       # model width = DEPTH * ASPECT_RATIO, rounded up to whole heads
HEAD_DIM = None           # width of one attention head
WINDOW_PATTERN = None     # per layer, S: half-context sliding window, L: full; the last is L
TOTAL_BATCH_SIZE = None   # tokens per optimizer step (gradient accumulation makes up the rest)
EMBEDDING_LR = None       # AdamW, token and value embeddings
UNEMBEDDING_LR = None     # AdamW, output head
MATRIX_LR = None          # Muon, every weight matrix inside the blocks
SCALAR_LR = None          # AdamW, per-layer residual and x0 scalars
WEIGHT_DECAY = None       # on Muon matrices, decayed linearly to zero over the run
ADAM_BETAS = None
WARMUP_RATIO = None       # share of the budget spent warming the learning rate up
WARMDOWN_RATIO = None     # share of the budget spent cooling it down, to FINAL_LR_FRAC
FINAL_LR_FRAC = None
DEPTH = None              # number of transformer blocks
DEVICE_BATCH_SIZE = None  # rows per forward pass; lower it when memory runs out
SEED = 42

# ---------------------------------------------------------------------------
# Setup: data, profile defaults, device, precision
# ---------------------------------------------------------------------------


def fail(reason, message=""):
    """The contract with the loop: one FAIL line, a non-zero exit."""
    print(f"FAIL: {reason} {message}".rstrip(), flush=True)
    sys.exit(1)


try:
    data = load_prepared()
except PrepareError as e:
    fail("error", str(e))
PROFILE = data.profile
MAX_SEQ_LEN = PROFILE.max_seq_len
TIME_BUDGET = float(os.environ.get("AUTORESEARCH_TIME_BUDGET") or PROFILE.time_budget)
FIXED_STEPS = int(os.environ.get("AUTORESEARCH_STEPS") or 0)
CONSTANTS = ("ASPECT_RATIO", "HEAD_DIM", "WINDOW_PATTERN", "TOTAL_BATCH_SIZE", "EMBEDDING_LR",
             "UNEMBEDDING_LR", "MATRIX_LR", "SCALAR_LR", "WEIGHT_DECAY", "ADAM_BETAS",
             "WARMUP_RATIO", "WARMDOWN_RATIO", "FINAL_LR_FRAC", "DEPTH", "DEVICE_BATCH_SIZE")
for _name in CONSTANTS:  # None means: the prepared profile's value
    if globals()[_name] is None:
        if _name not in PROFILE.train:
            fail("error", f"{_name} is None and profile {PROFILE.name} has no default for it")
        globals()[_name] = PROFILE.train[_name]

if os.environ.get("AUTORESEARCH_DEVICE"):
    device = torch.device(os.environ["AUTORESEARCH_DEVICE"])
elif torch.cuda.is_available():
    device = torch.device("cuda")
elif torch.backends.mps.is_available():
    device = torch.device("mps")
else:
    device = torch.device("cpu")

if device.type == "cuda":
    DEVICE_NAME = torch.cuda.get_device_name(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
else:
    DEVICE_NAME = device.type
BF16_OK = device.type != "cuda" or torch.cuda.is_bf16_supported()
# bf16 and compiled on a GPU with bf16; fp16 with loss scaling on one without (a T4); fp32 and
# not compiled on CPU and MPS, where full precision is the fast and safe choice and compiling
# costs more than it saves. The switches, when set, are named in the first progress line.
DTYPE_NAME = os.environ.get("AUTORESEARCH_DTYPE") or (
    "fp32" if device.type != "cuda" else "bf16" if BF16_OK else "fp16")
COMPILE_SWITCH = os.environ.get("AUTORESEARCH_COMPILE") or ("1" if device.type == "cuda" else "0")
SWITCHES = {k: os.environ[k] for k in ("AUTORESEARCH_DTYPE", "AUTORESEARCH_COMPILE")
            if os.environ.get(k)}
if DTYPE_NAME not in ("bf16", "fp16", "fp32"):
    fail("error", f"AUTORESEARCH_DTYPE={DTYPE_NAME!r} must be bf16, fp16 or fp32")
if DTYPE_NAME == "bf16" and not BF16_OK:
    fail("error", f"AUTORESEARCH_DTYPE=bf16 but {DEVICE_NAME} has no bf16; use fp16")
if COMPILE_SWITCH not in ("0", "1"):
    fail("error", f"AUTORESEARCH_COMPILE={COMPILE_SWITCH!r} must be 1 or 0")
COMPILE = COMPILE_SWITCH == "1"
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[DTYPE_NAME]
autocast = (torch.autocast(device.type, dtype=DTYPE) if DTYPE != torch.float32
            else torch.autocast(device.type, enabled=False))
# Fault injection for the tests of the loop's OOM retry: a micro-batch above this many rows
# fails as if the device had run out of memory.
FAIL_OOM_ABOVE = int(os.environ.get("AUTORESEARCH_FAIL_OOM_ABOVE") or 0)

torch.manual_seed(SEED)

# ---------------------------------------------------------------------------
# Model: RMSNorm, rotary, QK-norm, ReLU^2 MLP, value embeddings, sliding windows, soft-capping
# ---------------------------------------------------------------------------


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary(x, cos, sin):  # x: (B, T, H, D)
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)  # Karpathy's sense


def load_flash_attention_3():
    """FlashAttention-3 on Hopper through the `kernels` package, when it is there and loads."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return None
    try:
        from kernels import get_kernel
        return get_kernel("varunneal/flash-attention-3").flash_attn_interface
    except Exception as e:  # not installed, no network, wrong build: PyTorch attention it is
        print(f"FlashAttention-3 unavailable ({e.__class__.__name__}); using PyTorch attention")
        return None


FA3 = load_flash_attention_3()


def attention(q, k, v, window):  # (B, T, H, D) in and out; a query sees itself + `window` back
    T = q.size(1)
    if FA3 is not None:
        left = -1 if window >= T - 1 else window  # -1: unlimited
        out = FA3.flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
        return out[0] if isinstance(out, tuple) else out  # some builds also return the LSE
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if window >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:  # built on every call: under torch.compile it becomes part of the kernel
        i = torch.arange(T, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, n_head, head_dim, window, value_embed):
        super().__init__()
        self.n_head, self.head_dim, self.window = n_head, head_dim, window
        inner = n_head * head_dim
        self.c_q = nn.Linear(dim, inner, bias=False)
        self.c_k = nn.Linear(dim, inner, bias=False)
        self.c_v = nn.Linear(dim, inner, bias=False)
        self.c_proj = nn.Linear(inner, dim, bias=False)
        # Value embeddings enter through a per-head gate read off the first channels of x.
        self.ve_gate = nn.Linear(min(32, dim), n_head, bias=False) if value_embed else None

    def forward(self, x, ve, cos, sin):
        B, T, _ = x.shape
        shape = (B, T, self.n_head, self.head_dim)
        q, k, v = self.c_q(x).view(shape), self.c_k(x).view(shape), self.c_v(x).view(shape)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.view(shape)
        q, k = norm(rotary(q, cos, sin)), norm(rotary(k, cos, sin))
        y = attention(q, k, v, self.window)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim, n_head, head_dim, window, value_embed):
        super().__init__()
        self.attn = Attention(dim, n_head, head_dim, window, value_embed)
        self.mlp = MLP(dim)

    def forward(self, x, ve, cos, sin):
        x = x + self.attn(norm(x), ve, cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, depth, dim, n_head, head_dim, windows, seq_len, softcap=15.0):
        super().__init__()
        self.softcap = softcap
        self.wte = nn.Embedding(vocab_size, dim)
        # Value embeddings on alternating layers, always including the last.
        self.ve_layers = [i for i in range(depth) if i % 2 == (depth - 1) % 2]
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab_size, n_head * head_dim)
                                           for i in self.ve_layers})
        self.blocks = nn.ModuleList(Block(dim, n_head, head_dim, windows[i], i in self.ve_layers)
                                    for i in range(depth))
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(depth))
        self.x0_lambdas = nn.Parameter(torch.full((depth,), 0.1))
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(seq_len).float(), inv_freq)
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)
        self.init_weights(dim)

    @torch.no_grad()
    def init_weights(self, dim):
        bound = 3 ** 0.5 * dim ** -0.5  # uniform with the std of N(0, 1/dim)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                lin.weight.uniform_(-bound, bound)
            block.attn.c_proj.weight.zero_()  # every block starts as the identity
            block.mlp.c_proj.weight.zero_()
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.zero_()
        self.wte.weight.normal_(0, 1)
        for ve in self.value_embeds.values():
            ve.weight.uniform_(-bound, bound)
        self.lm_head.weight.normal_(0, 0.001)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = x0 = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin)
        logits = self.lm_head(norm(x)).float()
        logits = self.softcap * torch.tanh(logits / self.softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


# ---------------------------------------------------------------------------
# Optimizers: Muon for matrices, AdamW for the rest. Written out rather than built on
# torch.optim, whose first use imports torch._dynamo: on a CPU that takes about as long as
# importing torch, in every trial (BENCHMARKS.md).
# ---------------------------------------------------------------------------


class AdamW:
    """Adam with bias correction; no weight decay, as none of its parameters is decayed."""

    def __init__(self, param_groups, betas, eps=1e-10):
        self.param_groups = [dict(betas=betas, eps=eps) | group for group in param_groups]
        self.state = {}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.setdefault(p, dict(step=0, mean=torch.zeros_like(p),
                                                      square=torch.zeros_like(p)))
                state["step"] += 1
                state["mean"].lerp_(p.grad, 1 - beta1)
                state["square"].lerp_(p.grad.square(), 1 - beta2)
                denom = (state["square"] / (1 - beta2 ** state["step"])).sqrt_().add_(eps)
                p.addcdiv_(state["mean"], denom, value=-lr / (1 - beta1 ** state["step"]))


# Polar Express (Amsel et al. 2025): a tuned odd polynomial per iteration, which brings every
# singular value near 1 in five steps from anywhere in (0, 1].
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def orthogonalize(G):
    """The nearest semi-orthogonal matrix, approximately (Muon's update direction)."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # singular values below 1
    for a, b, c in POLAR_EXPRESS:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon:
    """Muon as Karpathy's autoresearch runs it: Nesterov momentum, orthogonalised; then each row
    (each column of a wide matrix) rescaled by a running mean of its squared update (NorMuon),
    the whole keeping the orthogonalised update's norm; a step scaled for the aspect ratio; and
    weight decay only where the update pushes the weight towards zero too (cautious)."""

    def __init__(self, params, lr, momentum=0.95, beta2=0.95, weight_decay=0.0):
        self.param_groups = [dict(params=list(params), lr=lr, momentum=momentum, beta2=beta2,
                                  weight_decay=weight_decay)]
        self.state = {}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mom, beta2, wd = (group[k] for k in ("lr", "momentum", "beta2", "weight_decay"))
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, cols = p.shape
                across = -1 if rows >= cols else -2  # the mean runs along the longer side
                state = self.state.setdefault(p, dict(
                    momentum=torch.zeros_like(p),
                    second=torch.zeros_like(p.float().mean(across, keepdim=True))))
                buf = state["momentum"]
                buf.lerp_(p.grad, 1 - mom)
                update = orthogonalize(p.grad.lerp(buf, mom)).float()  # Nesterov
                state["second"].lerp_(update.square().mean(across, keepdim=True), 1 - beta2)
                even = update * state["second"].clamp_min(1e-10).rsqrt()
                update = even * (update.norm() / even.norm().clamp_min(1e-10))
                step = lr * max(1.0, rows / cols) ** 0.5
                decay = wd * p * (update * p >= 0)
                p.sub_((step * (update + decay)).to(p.dtype))


# ---------------------------------------------------------------------------
# Throughput accounting
# ---------------------------------------------------------------------------

# Dense bf16/fp16 tensor-core peaks, TFLOP/s, by a substring of the device name (first match).
PEAK_TFLOPS = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("H800", 989), ("GH200", 989),
               ("B200", 2250), ("A100", 312), ("A800", 312), ("L40S", 362), ("L4", 121),
               ("A10G", 125), ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71), ("V100", 125),
               ("T4", 65))


def peak_flops(name):
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return 0.0  # unknown device (CPU, MPS): MFU is reported as 0


def mfu_percent(flops_per_token, tokens, seconds, peak):
    """Model FLOPs utilisation: the share of the device's peak spent on the model's matmuls."""
    return 100 * flops_per_token * tokens / seconds / peak if peak and seconds else 0.0


def peak_memory_mb():
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU: peak RSS


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def check_config():
    problems = []
    if not (isinstance(WINDOW_PATTERN, str) and WINDOW_PATTERN and set(WINDOW_PATTERN) <= set("SL")):
        problems.append(f"WINDOW_PATTERN={WINDOW_PATTERN!r} must be a non-empty string of S and L")
    if not (isinstance(HEAD_DIM, int) and HEAD_DIM > 0 and HEAD_DIM % 2 == 0):
        problems.append(f"HEAD_DIM={HEAD_DIM!r} must be a positive even integer (rotary)")
    if not (isinstance(DEPTH, int) and DEPTH > 0):
        problems.append(f"DEPTH={DEPTH!r} must be a positive integer")
    if not (isinstance(ASPECT_RATIO, int) and ASPECT_RATIO > 0):
        problems.append(f"ASPECT_RATIO={ASPECT_RATIO!r} must be a positive integer")
    if not (isinstance(DEVICE_BATCH_SIZE, int) and DEVICE_BATCH_SIZE > 0):
        problems.append(f"DEVICE_BATCH_SIZE={DEVICE_BATCH_SIZE!r} must be a positive integer")
    elif not (isinstance(TOTAL_BATCH_SIZE, int) and TOTAL_BATCH_SIZE > 0
              and TOTAL_BATCH_SIZE % (DEVICE_BATCH_SIZE * MAX_SEQ_LEN) == 0):
        problems.append(f"TOTAL_BATCH_SIZE={TOTAL_BATCH_SIZE!r} must be a positive multiple of "
                        f"DEVICE_BATCH_SIZE*MAX_SEQ_LEN={DEVICE_BATCH_SIZE}*{MAX_SEQ_LEN}")
    if not 0 <= WARMUP_RATIO + WARMDOWN_RATIO <= 1:
        problems.append(f"WARMUP_RATIO+WARMDOWN_RATIO={WARMUP_RATIO + WARMDOWN_RATIO} must be in [0, 1]")
    if problems:
        fail("error", "; ".join(problems))


def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def build_model():
    dim = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
    n_head = dim // HEAD_DIM
    pattern = (WINDOW_PATTERN * DEPTH)[:DEPTH]
    windows = [MAX_SEQ_LEN // 2 if c == "S" else MAX_SEQ_LEN for c in pattern]
    windows[-1] = MAX_SEQ_LEN
    model = GPT(data.vocab_size, DEPTH, dim, n_head, HEAD_DIM, windows, MAX_SEQ_LEN).to(device)
    # Matmul FLOPs per token, forward and backward: 6 per weight of the blocks and the head
    # (embeddings are lookups), plus attention scores and mixing over each layer's window.
    weights = sum(p.numel() for p in model.blocks.parameters()) + model.lm_head.weight.numel()
    flops = 6 * weights + sum(12 * n_head * HEAD_DIM * w for w in windows)
    return model, dim, flops


def make_optimizers(model, dim):
    scale = (dim / 768) ** -0.5  # AdamW rates were tuned at width 768
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    adam_groups = [
        dict(params=[model.wte.weight, *[v.weight for v in model.value_embeds.values()]],
             lr=EMBEDDING_LR * scale),
        dict(params=[model.lm_head.weight], lr=UNEMBEDDING_LR * scale),
        dict(params=[model.resid_lambdas], lr=SCALAR_LR * 0.01),
        dict(params=[model.x0_lambdas], lr=SCALAR_LR, betas=(0.96, 0.95)),
    ]
    adamw = AdamW(adam_groups, betas=tuple(ADAM_BETAS))
    muon = Muon(matrices, lr=MATRIX_LR, weight_decay=WEIGHT_DECAY)
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return adamw, muon


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def train():
    check_config()
    model, dim, flops_per_token = build_model()
    num_params = sum(p.numel() for p in model.parameters())
    adamw, muon = make_optimizers(model, dim)
    step_model = torch.compile(model, dynamic=False) if COMPILE else model
    scaler = torch.amp.GradScaler(device.type) if DTYPE == torch.float16 else None
    accum = TOTAL_BATCH_SIZE // (DEVICE_BATCH_SIZE * MAX_SEQ_LEN)
    loader = data.make_dataloader("train", DEVICE_BATCH_SIZE, device)
    x, y, epoch = next(loader)
    peak = peak_flops(DEVICE_NAME)
    uniform_loss = math.log(data.vocab_size)
    # The first steps compile kernels: left out of the budget, 11 of them as in Karpathy's
    # train.py, so that step counts compare.
    warmup_steps = 11 if COMPILE else 0
    print(f"profile {PROFILE.name} | device {DEVICE_NAME} ({DTYPE_NAME}"
          f"{', compiled' if COMPILE else ''}{', FA3' if FA3 else ''}) | params "
          f"{num_params / 1e6:.2f}M | width {dim} | depth {DEPTH} | grad accum {accum} | budget "
          f"{f'{FIXED_STEPS} steps' if FIXED_STEPS else f'{TIME_BUDGET:g}s'}"
          + "".join(f" | {k}={v}" for k, v in SWITCHES.items()), flush=True)
    if FAIL_OOM_ABOVE and DEVICE_BATCH_SIZE > FAIL_OOM_ABOVE:
        raise torch.OutOfMemoryError(f"out of memory (injected by AUTORESEARCH_FAIL_OOM_ABOVE="
                                     f"{FAIL_OOM_ABOVE})")

    step, training_time, smooth, compile_time = 0, 0.0, 0.0, 0.0
    next_report = 0.0
    t_loop = time.time()
    while True:
        sync()
        t0 = time.time()
        progress = step / FIXED_STEPS if FIXED_STEPS else min(training_time / TIME_BUDGET, 1.0)
        lrm = lr_multiplier(progress)
        for group in adamw.param_groups + muon.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = 0.85 + 0.10 * min(step / 300, 1.0)
            group["weight_decay"] = WEIGHT_DECAY * (1 - progress)
        for _ in range(accum):
            with autocast:
                loss = step_model(x, y)
            train_loss = loss.detach()
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
            x, y, epoch = next(loader)
        if scaler:
            for opt in (adamw, muon):
                scaler.step(opt)
            scaler.update()
        else:
            adamw.step()
            muon.step()
        model.zero_grad(set_to_none=True)
        loss_f = train_loss.item()  # also waits for the step to finish
        dt = time.time() - t0
        if step < warmup_steps:
            compile_time += dt
        else:
            training_time += dt

        if not math.isfinite(loss_f):
            fail("nan", f"train loss is {loss_f} at step {step}")
        smooth = 0.9 * smooth + 0.1 * loss_f
        smooth_loss = smooth / (1 - 0.9 ** (step + 1))
        if step >= 10 and smooth_loss > 1.5 * uniform_loss:
            fail("diverged", f"smoothed train loss {smooth_loss:.2f} at step {step} is far above "
                 f"a uniform guess ({uniform_loss:.2f})")
        step += 1
        done = step / FIXED_STEPS if FIXED_STEPS else training_time / TIME_BUDGET
        if step == 1:
            gc.collect()
            gc.freeze()  # keep the collector from pausing training
            gc.disable()
        if done >= next_report or done >= 1:
            tok_s = TOTAL_BATCH_SIZE / dt
            mfu = mfu_percent(flops_per_token, TOTAL_BATCH_SIZE, dt, peak)
            print(f"step {step:05d} | progress {min(done, 1):.3f} | loss {smooth_loss:.4f} | lrm "
                  f"{lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {tok_s:,.0f} | mfu {mfu:.1f}% | "
                  f"epoch {epoch}", flush=True)
            next_report = done + 0.005  # a report at least every 2%, even as step times vary
        if done >= 1:
            break
    gc.enable()

    t_eval = time.time()
    with autocast:
        val_bpb = data.evaluate_bpb(model, DEVICE_BATCH_SIZE)
    t_end = time.time()
    if not math.isfinite(val_bpb):
        fail("nan", f"val_bpb is {val_bpb}")
    tokens = step * TOTAL_BATCH_SIZE
    timed_tokens = (step - warmup_steps) * TOTAL_BATCH_SIZE
    mfu = mfu_percent(flops_per_token, timed_tokens, training_time, peak)
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {training_time:.1f}")
    print(f"total_seconds:    {t_end - T_START:.1f}")
    print(f"peak_vram_mb:     {peak_memory_mb():.1f}")
    print(f"mfu_percent:      {mfu:.2f}")
    print(f"total_tokens_M:   {tokens / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")
    print(f"startup_seconds:  {t_loop - T_START + compile_time:.1f}")
    print(f"compile_seconds:  {compile_time:.1f}")
    print(f"eval_seconds:     {t_end - t_eval:.1f}")
    print(f"device:           {DEVICE_NAME}")
    print(f"profile:          {PROFILE.name}")
    print(f"seed:             {SEED}", flush=True)


def is_oom(e):  # CUDA and MPS say "out of memory", the CPU allocator "can't allocate memory"
    text = str(e).lower()
    return (isinstance(e, torch.OutOfMemoryError) or "out of memory" in text
            or "can't allocate memory" in text)


if __name__ == "__main__":
    try:
        train()
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        fail("oom", f"DEVICE_BATCH_SIZE={DEVICE_BATCH_SIZE}: {str(e).splitlines()[0]}")
