"""Model passes for Q-GBFusion: insert_gbfusion, calibrate/fold_gbfusion, gradient_energy_report.

insert_gbfusion finds the fusion nodes of a neck/decoder with torch.fx and rewrites them
into GBFusion modules.  A candidate is a channel concat of >= 2 feature maps or an add of
two; it is a *fusion node* when its inputs come from different depths.  That is decided
per input by walking back its "segment" (through single-input ops until a graph input, a
fork or another merge) and listing the resampling steps on it (a change of H, W measured
on example inputs, else strided conv/pool, upsample/interpolate, transposed conv).  FPN
`lateral + upsample(top)`, U-Net `cat(upsample(x), skip)` and PAN concats have inputs with
different lists; residual adds and CSP/SPPF concats inside backbone blocks have equal
ones (both sides start at the block input with the same strides) and are left alone.

The rewrite happens in the module whose forward holds the op (the traced "unit"), which
becomes an fx.GraphModule; the model's other modules keep their classes.  Modules that
take containers (FPN's OrderedDict) need ``example_inputs``: each module's first call is
recorded and traced with that structure.  ``names`` is the fallback when tracing or the
heuristic fails.
"""
from __future__ import annotations

import inspect
import math
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .nn.gbfusion import FixedFusion, GBFusion

_CAT = {torch.cat, torch.concat, torch.concatenate}
_ADD = {operator.add, operator.iadd, torch.add}
_RESIZE_FUNCS = {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, F.pixel_shuffle,
                 F.pixel_unshuffle, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_STRIDE_FUNCS = {F.conv2d, F.max_pool2d, F.avg_pool2d}
_UP_MODULES = (nn.Upsample, nn.ConvTranspose2d, nn.PixelShuffle)
_STRIDED_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.PixelUnshuffle)
_LEAF_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, GBFusion)


class _NotTraceable(Exception):
    pass


class _Tracer(fx.Tracer):
    # Conv/Linear subclasses (q2ext's QuantConv2d, ...) stay single call_module nodes, so
    # resampling is read off their stride and fold can find its conv consumers.
    def is_leaf_module(self, m, qualname):
        return isinstance(m, _LEAF_TYPES) or super().is_leaf_module(m, qualname)


@dataclass
class InsertReport:
    """What insert_gbfusion did.  ``model`` is the model to use afterwards (the same object
    unless the root module itself had to become a GraphModule)."""
    model: nn.Module
    inserted: list = field(default_factory=list)  # dicts: name, unit, node, mode, branches, signatures
    skipped: list = field(default_factory=list)   # dicts: unit, node, reason
    failed: list = field(default_factory=list)    # dicts: module, error (trace failures)

    def __len__(self):
        return len(self.inserted)

    def __str__(self):
        lines = [f"insert_gbfusion: {len(self.inserted)} GBFusion node(s) inserted"]
        lines += [f"  {r['name']}: {r['mode']} of {r['branches']} ({r['unit'] or '<root>'}.{r['node']}; "
                  f"segments {r['signatures']})" for r in self.inserted]
        lines += [f"  skipped {r['unit'] or '<root>'}.{r['node']}: {r['reason']}" for r in self.skipped]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- tracing
def _record_inputs(model, example_inputs):
    """(args, kwargs) of every module's first call during one no-grad eval forward."""
    records, hooks = {}, []
    for name, m in model.named_modules():
        def pre(mod, args, kwargs, name=name):
            records.setdefault(name, (args, kwargs))
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(*(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)))
    finally:
        for h in hooks:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return records


def _placeholders(v):
    """Tensors -> fx.PH inside containers; ints would be baked into the graph: refuse."""
    if isinstance(v, torch.Tensor):
        return fx.PH
    if isinstance(v, (list, tuple)):
        return type(v)(_placeholders(x) for x in v)
    if isinstance(v, dict):
        return type(v)((k, _placeholders(x)) for k, x in v.items())
    if v is None or isinstance(v, (bool, str)):
        return v
    raise _NotTraceable(f"argument of type {type(v).__name__} would be baked into the graph")


def _trace(module, record):
    """(GraphModule, sample positional args or None)."""
    concrete, sample = None, None
    if record is not None:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*record[0], **record[1])
        if any(sig.parameters[p].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
               for p in bound.arguments):
            raise _NotTraceable("forward takes *args/**kwargs")
        concrete = {p: _placeholders(v) for p, v in bound.arguments.items()}
        sample = bound.arguments
    graph = _Tracer().trace(module, concrete_args=concrete)
    gm = fx.GraphModule(module, graph, type(module).__name__)
    if sample is not None:
        # eval + no_grad: shape propagation must not touch BatchNorm statistics
        modes = {m: m.training for m in gm.modules()}
        gm.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*sample.values())
        except Exception as exc:  # shapes are a refinement; the heuristics still work
            warnings.warn(f"insert_gbfusion: shape propagation failed on {type(module).__name__}: {exc}")
        finally:
            for m, t in modes.items():
                m.training = t
    return gm


# ---------------------------------------------------------------------------- detection
def _is_tensor(n):
    if not isinstance(n, fx.Node):
        return False
    if "type" in n.meta:
        return isinstance(n.meta["type"], type) and issubclass(n.meta["type"], torch.Tensor)
    if n.op == "call_function" and (n.target in (getattr, len) or (n.target is operator.getitem and
                                                                   not _is_tensor(n.args[0]))):
        return False
    return not (n.op == "call_method" and n.target in ("size", "dim", "numel"))


def _tensor_inputs(n):
    return [a for a in n.all_input_nodes if _is_tensor(a)]


def _tensor_users(n):
    return [u for u in n.users if _is_tensor(u) or u.op == "output"]


def _hw(n):
    tm = n.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return tuple(shape[-2:]) if shape is not None and len(shape) == 4 else None


def _resampling(gm, n, inp):
    """A label for the resolution change n makes to its tensor input, or None."""
    a, b = _hw(inp), _hw(n)
    if a is not None and b is not None:
        return None if a == b else f"x{b[0] / a[0]:g}"
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, _UP_MODULES):
            return "up"
        stride = getattr(m, "stride", 1)
        stride = stride if isinstance(stride, int) else max(stride)
        if isinstance(m, _STRIDED_MODULES) and (stride or 1) > 1 or isinstance(m, nn.PixelUnshuffle):
            return "down"
    if n.op == "call_function":
        if n.target in _RESIZE_FUNCS:
            return "resize"
        s = n.kwargs.get("stride", n.args[3] if n.target is F.conv2d and len(n.args) > 3 else 1)
        if n.target in _STRIDE_FUNCS and s not in (1, (1, 1), None):
            return "down"
    return None


def _segment(gm, n):
    """(resampling labels from the segment start up to n, endpoint label)."""
    labels, cur = [], n
    while True:
        if cur.op in ("placeholder", "get_attr"):
            return tuple(reversed(labels)), f"input:{cur.name}"
        tins = _tensor_inputs(cur)
        if len(tins) != 1:
            return tuple(reversed(labels)), f"merge:{cur.name}"
        if len(_tensor_users(cur)) > 1:
            return tuple(reversed(labels)), f"fork:{cur.name}"
        r = _resampling(gm, cur, tins[0])
        if r is not None:
            labels.append(r)
        cur = tins[0]


def _candidate(n):
    """(mode, branch nodes) when n is a channel concat or a 2-tensor add, else None."""
    if n.op == "call_function" and n.target in _CAT:
        seq = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if isinstance(seq, (list, tuple)) and len(seq) >= 2 and dim in (1, -3) and all(map(_is_tensor, seq)):
            return "concat", list(seq)
        return None
    is_add = (n.op == "call_function" and n.target in _ADD) or (n.op == "call_method" and n.target in ("add", "add_"))
    if is_add and len(n.args) == 2 and all(map(_is_tensor, n.args)) and n.kwargs.get("alpha", 1) == 1:
        return "add", list(n.args)
    return None


def _shapes_ok(mode, branches):
    shapes = [getattr(b.meta.get("tensor_meta"), "shape", None) for b in branches]
    if any(s is None for s in shapes):
        return True
    if any(len(s) != 4 for s in shapes):
        return False
    same = all(s[0] == shapes[0][0] and s[2:] == shapes[0][2:] for s in shapes)
    return same and (mode == "concat" or all(s == shapes[0] for s in shapes))


def _find(gm, explicit=None):
    """[(node, mode, branches, signatures)] of fusion nodes; plus [(node, reason)] skipped."""
    found, skipped = [], []
    for n in gm.graph.nodes:
        cand = _candidate(n)
        if cand is None or (explicit is not None and "*" not in explicit and n.name not in explicit):
            continue
        mode, branches = cand
        if not _shapes_ok(mode, branches):
            skipped.append((n, "not 4-D feature maps of equal N, H, W"))
            continue
        segs = [_segment(gm, b) for b in branches]
        sigs = [s for s, _ in segs]
        inputs = [e for _, e in segs if e.startswith("input:")]
        deep = len(set(sigs)) > 1 or (len(inputs) == len(segs) and len(set(inputs)) == len(inputs))
        if explicit is not None or deep:
            found.append((n, mode, branches, sigs))
        else:
            skipped.append((n, f"same depth on every input {sigs[0]} (residual/backbone merge)"))
    return found, skipped


def _owner(n):
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return None
    return next(iter(stack.values()))[0].split(".")[0] or None


# ---------------------------------------------------------------------------- rewriting
def _set_module(model, path, new):
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)


def _rewrite(gm, found, unit, report, kwargs):
    params = list(gm.parameters()) + list(gm.buffers())
    device = params[0].device if params else None
    for idx, (n, mode, branches, sigs) in enumerate(found):
        name = f"gbfusion_{idx}"
        while hasattr(gm, name):
            name += "_"
        mod = GBFusion(len(branches), mode=mode, **kwargs)
        gm.add_submodule(name, mod.to(device) if device is not None else mod)
        with gm.graph.inserting_before(n):
            new = gm.graph.call_module(name, args=(list(branches),))
        new.meta.update({k: v for k, v in n.meta.items() if k in ("tensor_meta", "type")})
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        report.inserted.append({"name": f"{unit}.{name}" if unit else name, "unit": unit, "node": n.name,
                                "mode": mode, "branches": len(branches), "signatures": sigs})
    gm.graph.lint()
    gm.recompile()


def insert_gbfusion(model: nn.Module, example_inputs=None, names=None, **gbfusion_kwargs) -> InsertReport:
    """Rewrite the fusion nodes of ``model`` into GBFusion modules, in place.

    Args:
        model: any nn.Module (a detector, a segmenter, a neck).
        example_inputs: a tensor or tuple of positional inputs for one forward (run in
            eval mode, no grad).  Gives exact shapes and lets modules that take containers
            or shape arithmetic be traced; without it each module is traced from scratch.
        names: explicit fallback: module paths ("decoder") whose every concat/add is
            converted, or "path:node" for single fx nodes ("neck:cat_1"); the depth
            heuristic is then off for those modules.
        **gbfusion_kwargs: passed to every GBFusion (beta, eta, tau, eps, lam_clip, ...).
    Returns an InsertReport; use ``report.model`` if the root itself was rewritten.
    """
    report = InsertReport(model)
    records = _record_inputs(model, example_inputs) if example_inputs is not None else {}

    def attempt(path, module):
        try:
            return _trace(module, records.get(path))
        except Exception as exc:  # fx raises many types; all mean "descend further"
            report.failed.append({"module": path or "<root>", "error": f"{type(exc).__name__}: {exc}"})
            return None

    def install(path, gm, found, skipped):
        report.skipped.extend({"unit": path, "node": n.name, "reason": r} for n, r in skipped)
        if not found:
            return
        _rewrite(gm, found, path, report, gbfusion_kwargs)
        if path:
            _set_module(report.model, path, gm)
        else:
            warnings.warn("insert_gbfusion rewrote the root module: use report.model")
            report.model = gm

    if names:
        per_unit = {}
        for spec in names:
            path, _, node = spec.partition(":")
            per_unit.setdefault(path, set()).add(node or "*")
        for path, nodes in per_unit.items():
            gm = attempt(path, model.get_submodule(path) if path else model)
            if gm is None:
                raise RuntimeError(f"insert_gbfusion: cannot trace module {path!r}: {report.failed[-1]['error']}")
            found, _ = _find(gm, explicit=nodes)
            if not found:
                raise ValueError(f"insert_gbfusion: no concat/add node {sorted(nodes)} in module {path!r}")
            install(path, gm, found, [])
        return report

    def visit(path, module):
        if isinstance(module, _LEAF_TYPES) or (module.__module__.startswith("torch.nn") and
                                                not isinstance(module, (nn.Sequential, nn.ModuleList,
                                                                        nn.ModuleDict))):
            return
        gm = attempt(path, module)
        if gm is None:
            for cname, child in module.named_children():
                visit(f"{path}.{cname}" if path else cname, child)
            return
        found, skipped = _find(gm)
        owners = {_owner(n) for n, *_ in found}
        if found and None not in owners:
            # Every fusion sits in a child's code: rewrite the smallest module that holds
            # it, so the others keep their classes.  If no child manages alone (e.g. it
            # takes shape ints from this level), rewrite here instead.
            before = len(report.inserted)
            for child in sorted(owners):
                visit(f"{path}.{child}" if path else child, module.get_submodule(child))
            if len(report.inserted) > before:
                return
        install(path, gm, found, skipped)

    visit("", model)
    return report


# ---------------------------------------------------------------------------- deployment (Eq. 11-12)
def calibrate_gbfusion(model: nn.Module, calib_batches) -> list:
    """Freeze every GBFusion and estimate its LN constants (Eq. 11) on calibration data.

    calib_batches: an iterable of model inputs (a tensor or a tuple of positional args).
    Afterwards each GBFusion runs with ``use_constants=True``:
    ``(fuse(alpha_i x_i) - mean) / std`` -- the "unfolded with constants" model.
    Returns the [(name, GBFusion)] calibrated.
    """
    nodes = [(n, m) for n, m in model.named_modules() if isinstance(m, GBFusion)]
    if not nodes:
        raise ValueError("calibrate_gbfusion: the model has no GBFusion module (run insert_gbfusion first)")
    for _, m in nodes:
        m.freeze()
        m.use_constants = False
        m.start_calibration()
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in calib_batches:
                model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for m, t in modes.items():
            m.training = t
    for _, m in nodes:
        m.finish_calibration()
        m.use_constants = True
    return nodes


def _affine_of(m: GBFusion, channels):
    """(branch_weights [K], per-channel scale [C], shift [C]) of the calibrated node, fp64."""
    alpha = m.alpha.double()
    mu, sigma = m.const_mean.double(), m.const_std.double()
    c = sum(channels) if m.mode == "concat" else channels[0]
    w = m.weight.detach().double() if m.weight is not None else torch.ones(c, dtype=torch.float64,
                                                                           device=alpha.device)
    b = m.bias.detach().double() if m.bias is not None else torch.zeros_like(w)
    return alpha, w / sigma, b - w * mu / sigma


def _conv_consumers(gm, target):
    """The Conv2d modules (path, module) that read the node's output, through Identity; or None."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    if len(calls) != 1:
        return None
    out, frontier = [], list(calls[0].users)
    while frontier:
        u = frontier.pop()
        if u.op != "call_module":
            return None
        mod = gm.get_submodule(u.target)
        if isinstance(mod, nn.Identity):
            frontier.extend(u.users)
        elif isinstance(mod, nn.Conv2d) and mod.groups == 1 and len(u.args) == 1 and not u.kwargs:
            out.append((u.target, mod))
        else:
            return None
    return out or None


@torch.no_grad()
def _fold_into_conv(conv, scale, shift, fold_shift):
    w = conv.weight.double()
    if fold_shift == "bias":
        delta = (w.sum((2, 3)) * shift.to(w.device).reshape(1, -1)).sum(1)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=w.device))
        conv.bias.copy_((conv.bias.double() + delta).to(conv.bias.dtype))
    conv.weight.copy_((w * scale.to(w.device).reshape(1, -1, 1, 1)).to(conv.weight.dtype))


def fold_gbfusion(model: nn.Module, calib_batches=None, fold_shift: str = "bias") -> list:
    """Deploy form of every GBFusion (App. 7): freeze alpha, LN -> calibrated constants,
    and fold alpha, 1/sigma and -mu/sigma into the following conv(s) (Eq. 12).

    Args:
        model: a model with GBFusion modules (e.g. after insert_gbfusion).
        calib_batches: iterable of model inputs for calibrate_gbfusion; None when the model
            was calibrated already.
        fold_shift: "bias" (Eq. 12: b' = b + W (shift); exact for unpadded convs, the zero
            padding of a padded conv then sees the un-shifted zero at the borders) or "keep"
            (the per-channel shift stays in the FixedFusion: exact everywhere).
    Where the output feeds anything but convs (e.g. FPN's top-down path), one constant
    per-channel affine (FixedFusion) replaces the node.  Returns one dict per node:
    name, mean, std, folded_into (conv paths or []), exact.
    """
    if fold_shift not in ("bias", "keep"):
        raise ValueError(f"fold_shift must be 'bias' or 'keep', got {fold_shift!r}")
    if calib_batches is not None:
        calibrate_gbfusion(model, calib_batches)
    nodes = [(n, m) for n, m in model.named_modules() if isinstance(m, GBFusion)]
    if not nodes or any(m.const_mean is None for _, m in nodes):
        raise ValueError("fold_gbfusion: every GBFusion must be calibrated (pass calib_batches)")
    rows = []
    for name, m in nodes:
        if m.branch_channels is None:
            raise ValueError(f"fold_gbfusion: {name} saw no calibration forward")
        alpha, scale, shift = _affine_of(m, m.branch_channels)
        parent_path, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        convs = _conv_consumers(parent, attr) if isinstance(parent, fx.GraphModule) else None
        foldable = bool(convs) and all(conv.in_channels == scale.numel() for _, conv in convs)
        # concat: alpha of each branch goes into its input channels; add: the branches
        # share channels, so alpha stays behind as the branch weights
        full = scale * torch.repeat_interleave(alpha, torch.tensor(m.branch_channels, device=alpha.device)) \
            if m.mode == "concat" else scale
        # "keep" leaves shift / scale in front of the scaled conv: needs every scale != 0
        if foldable and (fold_shift == "bias" or bool((full != 0).all())):
            weights = torch.ones_like(alpha) if m.mode == "concat" else alpha
            for _, conv in convs:
                _fold_into_conv(conv, full, shift, fold_shift)
            new = FixedFusion(m.mode, weights, None, shift / full if fold_shift == "keep" else None,
                              m.calib_dtype)
            exact = fold_shift == "keep" or all(p == 0 for _, conv in convs for p in _padding(conv))
            rows.append({"name": name, "folded_into": [f"{parent_path}.{p}" if parent_path else p for p, _ in convs],
                         "exact": exact})
        else:
            new = FixedFusion(m.mode, alpha, scale, shift, m.calib_dtype)
            rows.append({"name": name, "folded_into": [], "exact": True})
        rows[-1].update(mean=float(m.const_mean), std=float(m.const_std))
        setattr(parent, attr, new.to(m.lam.device))
    return rows


def _padding(conv):
    p = conv.padding
    return (1,) if isinstance(p, str) and p != "valid" else ((0,) if isinstance(p, str) else tuple(p))


# ---------------------------------------------------------------------------- diagnostics
@dataclass
class EnergyReport:
    """Per fusion node: each branch's G-bar, alpha, lam and the balance ratio (Fig. 1(b)/3(b))."""
    rows: list

    def data(self) -> dict:
        """{node name: {"g_ema": [...], "alpha": [...], "lam": [...], "balance_ratio": float}} for plotting."""
        return {r["name"]: {k: r[k] for k in ("g_ema", "alpha", "lam", "balance_ratio")} for r in self.rows}

    def table(self) -> str:
        head = "| node | mode | branch | G-bar | alpha | lam | balance ratio |\n|---|---|---|---|---|---|---|"
        lines = [head]
        for r in self.rows:
            for i, (g, a, lam) in enumerate(zip(r["g_ema"], r["alpha"], r["lam"])):
                ratio = f"{r['balance_ratio']:.3f}" if i == 0 else ""
                lines.append(f"| {r['name'] if i == 0 else ''} | {r['mode'] if i == 0 else ''} | {i} | {g:.4g} | "
                             f"{a:.4f} | {lam:+.4f} | {ratio} |")
        return "\n".join(lines)

    __str__ = table


def gradient_energy_report(model: nn.Module) -> EnergyReport:
    """Snapshot of every GBFusion's controller (one host sync for the whole model)."""
    nodes = [(n, m) for n, m in model.named_modules() if isinstance(m, GBFusion)]
    if not nodes:
        return EnergyReport([])
    flat = torch.cat([torch.cat([m.g_ema, m.alpha.to(m.g_ema.device), m.lam]) for _, m in nodes]).cpu().tolist()
    rows, at = [], 0
    for name, m in nodes:
        k = m.num_branches
        g, alpha, lam = flat[at:at + k], flat[at + k:at + 2 * k], flat[at + 2 * k:at + 3 * k]
        at += 3 * k
        rows.append({"name": name or "<root>", "mode": m.mode, "g_ema": g, "alpha": alpha, "lam": lam,
                     "balance_ratio": max(g) / min(g) if min(g) > 0 else math.inf, "frozen": m.frozen})
    return EnergyReport(rows)
