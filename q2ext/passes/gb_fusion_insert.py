"""The Q-GBFusion insertion pass: insert_gbfusion finds the fusion nodes of a neck/decoder with torch.fx and rewrites them
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
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..nn.gb_fusion import GBFusion
from ._surgery import LEAF_TYPES, Tracer, eval_no_grad, set_submodule

_CAT = {torch.cat, torch.concat, torch.concatenate}
_ADD = {operator.add, operator.iadd, torch.add}
_RESIZE_FUNCS = {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, F.pixel_shuffle,
                 F.pixel_unshuffle, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_STRIDE_FUNCS = {F.conv2d, F.max_pool2d, F.avg_pool2d}
_UP_MODULES = (nn.Upsample, nn.ConvTranspose2d, nn.PixelShuffle)
_STRIDED_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.PixelUnshuffle)


class _NotTraceable(Exception):
    pass


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
    try:
        with eval_no_grad(model):
            model(*(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)))
    finally:
        for h in hooks:
            h.remove()
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
    graph = Tracer().trace(module, concrete_args=concrete)
    gm = fx.GraphModule(module, graph, type(module).__name__)
    if sample is not None:
        # eval + no_grad: shape propagation must not touch BatchNorm statistics
        try:
            with eval_no_grad(gm):
                ShapeProp(gm).propagate(*sample.values())
        except Exception as exc:  # shapes are a refinement; the heuristics still work
            warnings.warn(f"insert_gbfusion: shape propagation failed on {type(module).__name__}: {exc}")
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
            set_submodule(report.model, path, gm)
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
        if isinstance(module, LEAF_TYPES) or (module.__module__.startswith("torch.nn") and
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
