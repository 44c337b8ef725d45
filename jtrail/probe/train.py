"""Train TRAIL's probe head with Optax: AdamW + warmup-cosine LR, cross-entropy over length bins.

One head per candidate layer is trained on the same requests (prompt-mean samples and per-token
samples), evaluated on held-out requests (`probe.eval`), and the layer with the lowest refined MAE wins.
Inputs are standardized for optimization, and the standardization is then folded into the first
linear layer, so the saved head takes raw hidden states exactly as the engine's tap gives them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jtrail.models.errors import JtrailError
from jtrail.models.probe import ProbeConfig, ProbeHead, equal_bins, log_bins
from jtrail.models.shapes import pow2_bucket
from jtrail.probe.data import ProbeFeatures
from jtrail.probe.eval import LayerEval, evaluate_probs


class ProbeTrainingError(JtrailError, ValueError):
    """Bad training options or data (e.g. a bins spec that cannot be parsed, too few requests)."""


@dataclass(frozen=True)
class TrainOptions:
    bins: str = "equal:10:512"
    epochs: int = 4
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.01
    val_fraction: float = 0.2
    seed: int = 0
    hidden: int = 512
    steps_per_call: int = 64  # minibatches per jitted scan (one progress-bar tick)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.hidden < 1 or self.steps_per_call < 1:
            raise ProbeTrainingError("epochs, batch_size, hidden and steps_per_call must be >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ProbeTrainingError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ProbeTrainingError("lr must be > 0 and weight_decay >= 0")
        parse_bins(self.bins)


def parse_bins(spec: str) -> tuple[float, ...]:
    """'equal:K:MAX' (TRAIL: equal:10:512), 'log:K:MAX', or 'edges:0,8,16,...' -> bin edges."""
    kind, _, rest = spec.partition(":")
    try:
        if kind in ("equal", "log"):
            k_str, max_str = rest.split(":")
            k, hi = int(k_str), float(max_str)
            if k < 2 or hi <= (8.0 if kind == "log" else 0.0):
                raise ValueError("need K >= 2 and a larger MAX")
            return equal_bins(k, hi) if kind == "equal" else log_bins(k, hi)
        if kind == "edges":
            edges = tuple(float(x) for x in rest.split(","))
            if len(edges) < 3 or edges[0] != 0.0 or np.any(np.diff(edges) <= 0):
                raise ValueError("need >= 3 strictly increasing edges starting at 0")
            return edges
    except ValueError as e:
        raise ProbeTrainingError(f"bad bins spec {spec!r}: {e}") from None
    raise ProbeTrainingError(f"bad bins spec {spec!r}: expected equal:K:MAX, log:K:MAX or edges:0,a,b,...")


def split_requests(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random split BY REQUEST (a request's tokens never straddle train and val)."""
    n_val = int(round(n * val_fraction))
    if n < 2 or n_val < 1 or n_val >= n:
        raise ProbeTrainingError(f"need at least 2 requests and a non-empty train/val split, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@functools.lru_cache(maxsize=16)
def _optimizer(lr: float, weight_decay: float, total: int) -> optax.GradientTransformation:
    """AdamW + warmup-cosine; cached so equal settings give the same (hashable, static) object. Optax
    needs a decay phase after the warm-up (decay_steps > warmup_steps): a run of one step trains at
    constant `lr`, and the warm-up never takes every step."""
    if total < 2:
        return optax.adamw(lr, weight_decay=weight_decay)
    warmup = min(max(1, min(200, total // 20)), total - 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=lr * 0.02)
    return optax.adamw(sched, weight_decay=weight_decay)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_chunk(graphdef, tx, params, opt_state, xd, yd, mu, sd, idx):
    """A scan of minibatch steps; idx [C, B] indexes the device-resident samples xd/yd."""
    def loss_fn(p, xb, yb):
        logits = nnx.merge(graphdef, p)(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def step(carry, ib):
        p, o = carry
        xb = (xd[ib].astype(jnp.float32) - mu) / sd
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yd[ib])
        upd, o = tx.update(g, o, p)
        return (optax.apply_updates(p, upd), o), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), idx)
    return params, opt_state, losses.mean()


def train_head(x: np.ndarray, y: np.ndarray, cfg: ProbeConfig, opts: TrainOptions, desc: str = "train",
               progress: bool = True) -> tuple[ProbeHead, list[float]]:
    """x [S, d] hidden states (any float dtype), y [S] bin labels -> trained head, loss per call."""
    if x.ndim != 2 or x.shape[1] != cfg.d_model or len(x) != len(y) or len(x) == 0:
        raise ProbeTrainingError(f"need x [S, {cfg.d_model}] and y [S] with S > 0, got {x.shape}, {y.shape}")
    rng = np.random.default_rng(opts.seed)
    sub = x[rng.choice(len(x), size=min(len(x), 65536), replace=False)].astype(np.float32)
    mu = sub.mean(0)
    sd = sub.std(0)
    sd = np.maximum(sd, 1e-3 * float(sd.mean()) + 1e-6)  # dead dimensions must not blow up
    # Train under a canonical config (layer 0) so every layer shares one compiled step.
    head = ProbeHead(dataclasses.replace(cfg, layer=0), rngs=nnx.Rngs(opts.seed))
    graphdef, params = nnx.split(head, nnx.Param)
    bs = min(opts.batch_size, len(x))
    steps_per_epoch = math.ceil(len(x) / bs)
    chunk = min(opts.steps_per_call, steps_per_epoch * opts.epochs)
    calls = math.ceil(steps_per_epoch * opts.epochs / chunk)
    total = calls * chunk
    tx = _optimizer(opts.lr, opts.weight_decay, total)
    opt_state = tx.init(params)
    xd, yd = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    mu_d, sd_d = jnp.asarray(mu), jnp.asarray(sd)
    # Enough epoch permutations to fill `total` steps; the tail of each permutation wraps around.
    perms = [np.resize(rng.permutation(len(x)), steps_per_epoch * bs).reshape(steps_per_epoch, bs)
             for _ in range(math.ceil(total / steps_per_epoch))]
    batches = np.concatenate(perms)[:total].astype(np.int32)
    losses = []
    bar = tqdm(range(calls), desc=desc, unit="chunk", disable=not progress)
    for c in bar:
        params, opt_state, loss = _train_chunk(graphdef, tx, params, opt_state, xd, yd, mu_d, sd_d,
                                               jnp.asarray(batches[c * chunk:(c + 1) * chunk]))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    nnx.update(head, params)
    head.cfg = cfg
    # Fold the standardization: W' = W / sd (per input row), b' = b - (mu / sd) @ W.
    w = np.asarray(head.fc1.kernel[...], np.float64)
    b = np.asarray(head.fc1.bias[...], np.float64)
    head.fc1.kernel.set_value(jnp.asarray(w / sd[:, None], jnp.float32))
    head.fc1.bias.set_value(jnp.asarray(b - (mu / sd) @ w, jnp.float32))
    return head, losses


@functools.partial(jax.jit, static_argnums=0)
def _probs(graphdef, state, x):
    return nnx.merge(graphdef, state).probs(x)


def head_probs(head: ProbeHead, x: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Softmax bin probabilities [S, K] for hidden states x [S, d], in chunks padded to a power of two
    (few compiled shapes)."""
    graphdef, state = nnx.split(head)
    outs = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        rows = min(batch, pow2_bucket(len(xb)))
        pad = np.zeros((rows - len(xb), x.shape[1]), x.dtype)
        outs.append(np.asarray(_probs(graphdef, state, jnp.asarray(np.concatenate([xb, pad]))))[:len(xb)])
    return np.concatenate(outs) if outs else np.zeros((0, head.cfg.num_bins), np.float32)


@dataclass
class LayerResult:
    layer: int
    head: ProbeHead
    eval: LayerEval
    final_loss: float


def evaluate_requests(head: ProbeHead, feats: ProbeFeatures, requests: np.ndarray, mean_len: float
                      ) -> LayerEval:
    """Held-out evaluation of `head` (tapping its own cfg.layer) on the requests at indices `requests`."""
    requests = np.asarray(requests, np.int64)
    if len(requests) == 0:
        raise ProbeTrainingError("no requests to evaluate")
    li = feats.layer_index(head.cfg.layer)
    pos = np.full(feats.num_requests, -1)
    pos[requests] = np.arange(len(requests))  # renumbered 0..n-1 for the evaluator
    tok = pos[feats.token_request] >= 0
    return evaluate_probs(head.cfg, head_probs(head, feats.prompt_states[requests, li]),
                          head_probs(head, feats.token_states[tok, li]), pos[feats.token_request[tok]],
                          feats.token_generated[tok], feats.output_lengths[requests], feats.max_new_tokens,
                          mean_len)


def train_and_evaluate(feats: ProbeFeatures, opts: TrainOptions, layers: tuple[int, ...] | None = None,
                       progress: bool = True, split: tuple[np.ndarray, np.ndarray] | None = None
                       ) -> tuple[dict[int, LayerResult], dict[str, object]]:
    """Train one head per layer on the train requests, evaluate on the held-out ones. `split` gives
    (train, val) request indices; default: a random split by request with `opts.val_fraction`."""
    layers = tuple(layers or feats.layers)
    edges = parse_bins(opts.bins)
    if split is None:
        train_req, val_req = split_requests(feats.num_requests, opts.val_fraction, opts.seed)
    else:
        train_req, val_req = (np.sort(np.asarray(s, np.int64)) for s in split)
        if len(train_req) == 0 or len(val_req) == 0 or np.intersect1d(train_req, val_req).size:
            raise ProbeTrainingError("train and validation requests must be non-empty and disjoint")
    is_train = np.zeros(feats.num_requests, bool)
    is_train[train_req] = True
    tok_train = is_train[feats.token_request]
    remaining = feats.token_remaining
    mean_len = float(feats.output_lengths[train_req].mean())
    d = feats.prompt_states.shape[-1]
    results: dict[int, LayerResult] = {}
    for layer in layers:
        li = feats.layer_index(layer)
        cfg = ProbeConfig(d_model=d, layer=layer, bin_edges=edges, hidden=opts.hidden)
        x = np.concatenate([feats.prompt_states[train_req, li], feats.token_states[tok_train, li]])
        y = np.concatenate([cfg.bin_of(feats.output_lengths[train_req]), cfg.bin_of(remaining[tok_train])])
        head, losses = train_head(x, y, cfg, opts, desc=f"layer {layer} {opts.bins}", progress=progress)
        del x, y  # one layer's training copy at a time (replay features run to many GB)
        ev = evaluate_requests(head, feats, val_req, mean_len)
        results[layer] = LayerResult(layer, head, ev, losses[-1])
    is_val = np.zeros(feats.num_requests, bool)
    is_val[val_req] = True
    data = {"num_requests": feats.num_requests, "train_requests": int(len(train_req)),
            "val_requests": int(len(val_req)), "train_samples": int(len(train_req) + tok_train.sum()),
            "val_token_samples": int(is_val[feats.token_request].sum()), "mean_train_output_len": mean_len,
            "max_new_tokens": feats.max_new_tokens, "finished_fraction": float(feats.finished.mean()),
            "mean_prompt_len": float(feats.prompt_lengths.mean())}
    return results, data


def best_layer(results: dict[int, LayerResult]) -> int:
    return min(results, key=lambda k: results[k].eval.metrics["refined_mae"])

