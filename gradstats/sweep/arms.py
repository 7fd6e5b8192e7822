"""Configurations of a sweep: :class:`Arm` (a named StableOptimizer setting, torch's clip
or no clipping), the built-in ones and the spec language of ``gradstats sweep --config``.

Spec strings (``NAME=SPEC`` on the command line; :func:`parse_arm`): items joined by
``+``, each a call with literal arguments:

* policies: ``FixedNorm(1.0)``, ``ZScoreClip(z_thresh=2.0, warmup=10)``,
  ``QuantileClip(0.9)``, ``AdaptiveGradClip(0.01)`` (chained in order into ``policy=``)
  and ``SpikeSkip(warmup=16)`` (``spike=``);
* ``NoSkip()``: ``skip_nonfinite=False``;
* ``Recommended(**overrides)``: the full preset (:func:`gradstats.presets.recommended_kwargs`
  around StableAdamW); ``RecommendedGrad(**overrides)``: the gradient side alone;
* baselines: ``TorchClip(1.0)`` (``torch.nn.utils.clip_grad_norm_`` then the optimizer's
  step) and ``NoClip()`` (the optimizer alone). Both are logged like a StableOptimizer.

Examples: ``zs=ZScoreClip(warmup=10)+SpikeSkip(warmup=16, k=4)``, ``tc05=TorchClip(0.5)``.
A bare name (``zscore``) is a built-in configuration (:func:`builtin_arms`).
"""
from __future__ import annotations

import ast
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from .. import policies as P
from .. import presets

__all__ = ["Arm", "builtin_arms", "parse_arm", "resolve_arms", "DEFAULT_ARMS"]

#: configurations of ``gradstats sweep`` when none are given
DEFAULT_ARMS = ("none", "torch-clip", "zscore", "spike", "recommended")

_CLIP_KINDS = ("stable", "torch", "none")


@dataclass
class Arm:
    """One configuration of a sweep.

    Args:
        name: its name in tables, plots and log paths.
        clip: ``"stable"`` (a :class:`gradstats.StableOptimizer` built with ``kwargs``),
            ``"torch"`` (``torch.nn.utils.clip_grad_norm_(max_norm)`` then the inner
            step) or ``"none"`` (the inner optimizer alone).
        kwargs: keyword arguments of :class:`gradstats.StableOptimizer` (``max_norm``,
            ``policy``, ``spike``, ``skip_nonfinite``, ...); policy objects are copied for
            every run.
        max_norm: the threshold of ``clip="torch"``.
        inner: an optimizer class (or factory ``f(params, **kw)``) that replaces AdamW
            when the training function asks :meth:`RunConfig.optimizer` for AdamW (the
            default); for update-level techniques (e.g. StableAdamW). Must be importable
            by name in worker processes.
        description: one line for the report.

    Raises:
        ValueError: unknown ``clip``, or ``clip="torch"`` without ``max_norm``.
    """

    name: str
    clip: str = "stable"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    max_norm: Optional[float] = None
    inner: Optional[Callable[..., Any]] = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty string without '/', got "
                             f"{self.name!r}")
        if self.clip not in _CLIP_KINDS:
            raise ValueError(f"clip must be one of {_CLIP_KINDS}, got {self.clip!r}")
        if self.clip == "torch" and self.max_norm is None:
            raise ValueError("clip='torch' needs max_norm")
        if self.clip != "stable" and self.kwargs:
            raise ValueError(f"kwargs are StableOptimizer arguments; clip={self.clip!r} "
                             "takes none")
        if not self.description:
            self.description = self.describe()

    def describe(self) -> str:
        """A one-line description of what the configuration runs."""
        inner = f" with inner {getattr(self.inner, '__name__', self.inner)}" \
            if self.inner is not None else ""
        if self.clip == "none":
            return "no clipping (the optimizer alone)" + inner
        if self.clip == "torch":
            return f"torch.nn.utils.clip_grad_norm_(max_norm={self.max_norm:g})" + inner
        parts = [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"StableOptimizer({', '.join(parts)})" + inner

    def stable_kwargs(self) -> Dict[str, Any]:
        """Fresh StableOptimizer keyword arguments (policy objects deep-copied)."""
        return copy.deepcopy(dict(self.kwargs))


def builtin_arms() -> Dict[str, Arm]:
    """The built-in configurations, by name.

    ``none``, ``torch-clip`` (max_norm 1.0), ``fixed`` (``StableOptimizer(max_norm=1.0)``),
    ``zscore``, ``quantile``, ``spike`` (each policy with its defaults; ``spike`` alone,
    no clipping), ``recommended`` (the full preset,
    :func:`gradstats.presets.recommended_adamw`: :func:`~gradstats.presets.recommended_kwargs`
    around StableAdamW where the task asks for AdamW).
    """
    arms = [
        Arm("none", clip="none"),
        Arm("torch-clip", clip="torch", max_norm=1.0),
        Arm("fixed", kwargs={"max_norm": 1.0}),
        Arm("zscore", kwargs={"policy": P.ZScoreClip()}),
        Arm("quantile", kwargs={"policy": P.QuantileClip()}),
        Arm("spike", kwargs={"spike": P.SpikeSkip()}),
        Arm("recommended", kwargs=presets.recommended_kwargs(),
            inner=presets.recommended_inner(),
            description="gradstats.presets.recommended_adamw(): StableAdamW (update "
                        "clipping) in place of AdamW, " + presets.describe()),
    ]
    return {a.name: a for a in arms}


_POLICIES: Dict[str, Callable[..., Any]] = {
    "FixedNorm": P.FixedNorm, "ZScoreClip": P.ZScoreClip, "QuantileClip": P.QuantileClip,
    "AdaptiveGradClip": P.AdaptiveGradClip,
}
_CALLS = tuple(_POLICIES) + ("SpikeSkip", "NoSkip", "Recommended", "RecommendedGrad",
                              "TorchClip", "NoClip")


def _items(node: ast.AST) -> List[ast.Call]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _items(node.left) + _items(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return [node]
    raise ValueError("each item must be a call such as ZScoreClip(warmup=10)")


def parse_arm(spec: str, name: Optional[str] = None) -> Arm:
    """An :class:`Arm` from ``"NAME=SPEC"`` or ``SPEC`` (module docstring), or a built-in
    name.

    Raises:
        ValueError: the spec does not parse; the message names the accepted calls.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"config spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    head, eq, tail = text.partition("=")
    if eq and "(" not in head:
        name, text = head.strip(), tail.strip()
    builtin = builtin_arms()
    if text in builtin:
        arm = builtin[text]
        if name and name != arm.name:
            arm = Arm(name, arm.clip, arm.kwargs, arm.max_norm, arm.inner, arm.description)
        return arm
    try:
        tree = ast.parse(text, mode="eval").body
        calls = _items(tree)
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"config {spec!r}: cannot parse ({e}); write NAME=ITEM+ITEM with "
                         f"items {', '.join(c + '(...)' for c in _CALLS)} or a built-in "
                         f"name ({', '.join(builtin)})") from None
    policy: List[Any] = []
    kwargs: Dict[str, Any] = {}
    clip, max_norm, inner = "stable", None, None
    for c in calls:
        fn = c.func.id  # type: ignore[attr-defined]
        try:
            args = [ast.literal_eval(a) for a in c.args]
            kw = {k.arg: ast.literal_eval(k.value) for k in c.keywords}
        except ValueError:
            raise ValueError(f"config {spec!r}: arguments of {fn}() must be literals") from None
        if None in kw:
            raise ValueError(f"config {spec!r}: **kwargs are not accepted in {fn}()")
        if fn in _POLICIES:
            policy.append(_POLICIES[fn](*args, **kw))
        elif fn == "SpikeSkip":
            kwargs["spike"] = P.SpikeSkip(*args, **kw)
        elif fn == "NoSkip":
            kwargs["skip_nonfinite"] = False
        elif fn in ("Recommended", "RecommendedGrad"):
            kwargs.update(presets.recommended_kwargs(*args, **kw))
            if fn == "Recommended":
                inner = presets.recommended_inner()
        elif fn == "TorchClip":
            clip, max_norm = "torch", float(args[0] if args else kw.get("max_norm", 1.0))
        elif fn == "NoClip":
            clip = "none"
        else:
            raise ValueError(f"config {spec!r}: unknown item {fn}(); accepted: "
                             f"{', '.join(_CALLS)}")
    if policy:
        if "policy" in kwargs:
            old = kwargs["policy"]
            policy = (list(old) if isinstance(old, (list, tuple)) else [old]) + policy
        kwargs["policy"] = policy[0] if len(policy) == 1 else policy
    if clip != "stable" and kwargs:
        raise ValueError(f"config {spec!r}: TorchClip()/NoClip() cannot be combined with "
                         "StableOptimizer items")
    return Arm(name or text, clip=clip, kwargs=kwargs if clip == "stable" else {},
               max_norm=max_norm, inner=inner)


ArmLike = Union[str, Arm]


def resolve_arms(configs: Union[None, Sequence[ArmLike], Mapping[str, Any]]) -> List[Arm]:
    """Configurations from names, spec strings, :class:`Arm` objects, or a dict
    ``{name: Arm | spec | StableOptimizer kwargs}``.

    Raises:
        ValueError: a duplicate name or a bad spec.
        TypeError: an entry of another type.
    """
    if configs is None:
        configs = DEFAULT_ARMS
    out: List[Arm] = []
    if isinstance(configs, Mapping):
        for name, v in configs.items():
            if isinstance(v, Arm):
                a = v if v.name == name else Arm(name, v.clip, v.kwargs, v.max_norm,
                                                   v.inner, v.description)
            elif isinstance(v, str):
                a = parse_arm(v, name)
            elif isinstance(v, Mapping):
                a = Arm(name, kwargs=dict(v))
            else:
                raise TypeError(f"configs[{name!r}] must be an Arm, a spec string or a dict "
                                f"of StableOptimizer arguments, got {type(v).__name__}")
            out.append(a)
    else:
        if isinstance(configs, (str, Arm)):
            configs = [configs]
        for v in configs:
            if isinstance(v, Arm):
                out.append(v)
            elif isinstance(v, str):
                out.append(parse_arm(v))
            else:
                raise TypeError(f"a config must be a name, a spec string or an Arm, got "
                                f"{type(v).__name__}")
    names = [a.name for a in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"configs: duplicate names {dup}")
    if not out:
        raise ValueError("configs: at least one configuration is needed")
    return out
