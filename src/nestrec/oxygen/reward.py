"""Unified reward mapping: one scalar per (request, candidate), scenario-aware (design brief §8).

Four families, each normalised per scenario before weighting (so a scenario's weights, not its
raw scales, decide what matters):

* ``format``    — 1 if the generated SID decodes to a real item allowed in the request, else 0;
* ``relevance`` — cosine between the item's text vector and the request's context vector: the
  query (search), the trigger item (related) or the centroid of the recent history (homepage,
  channel);
* ``ranking``   — the frozen ranker's business value, an arithmetic expression over its heads
  (``watch``, ``like``, ``love``), per scenario, e.g. ``watch + 0.5 * like`` (GMV-like forms such
  as ``love * price`` work the same way once a dataset has the column);
* ``diversity`` — mean SID Hamming distance (fraction of levels that differ) to the other
  candidates of the group;
* ``engagement`` — agreement with what the user actually engaged with in the log: the fraction
  of SID levels a candidate shares with the logged item as a prefix (1 for the item itself).
  Not one of the paper's four families (ours, design): measured on ML-1M, the four alone rank
  the logged item *below* the policy's own candidates (R* ≈ −1.2 σ), so RL drifts away from what
  users watch; this term ties the reward to the logged behaviour, as a production reward model
  trained on that behaviour would.

Normalisation: z-score of each term over all (row, candidate) entries of the scenario in the
batch, the ground-truth item included, so ``R*`` (the ground truth's reward, SA-GCPO's group-clip
threshold) is on the same scale as the candidates'. A constant term contributes 0.

Config (``conf/reward/*.yaml``) names terms and scenarios; an unknown term, scenario or head in an
expression is a one-line :class:`~nestrec.errors.ConfigError` at start-up, not a crash mid-run.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping

import torch

from nestrec.data.scenarios import SCENARIO_KINDS
from nestrec.errors import ConfigError

__all__ = ["TERMS", "UnifiedRewardMap", "ValueExpression"]

TERMS = ("format", "relevance", "ranking", "diversity", "engagement")

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


class ValueExpression:
    """A safe arithmetic expression over named tensors (no calls, attributes or builtins)."""

    def __init__(self, source: str, names: tuple[str, ...], where: str):
        self.source = str(source)
        try:
            self.tree = ast.parse(self.source, mode="eval").body
        except SyntaxError as err:
            raise ConfigError(f"{where}: cannot parse value expression {self.source!r}: {err.msg}") from None
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Name) and node.id not in names:
                raise ConfigError(
                    f"{where}: unknown name {node.id!r} in {self.source!r}; known: {', '.join(names)}"
                )
            if not isinstance(
                node, (ast.BinOp, ast.UnaryOp, ast.Name, ast.Constant, ast.Load, *tuple(_OPS))
            ) or (isinstance(node, ast.Constant) and not isinstance(node.value, (int, float))):
                raise ConfigError(
                    f"{where}: {self.source!r} may only use numbers, + - * / and {', '.join(names)}"
                )

    def __call__(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        def run(node):
            if isinstance(node, ast.Constant):
                return node.value
            if isinstance(node, ast.Name):
                return values[node.id]
            if isinstance(node, ast.UnaryOp):
                return _OPS[type(node.op)](run(node.operand))
            return _OPS[type(node.op)](run(node.left), run(node.right))

        return run(self.tree)


class UnifiedRewardMap:
    """``R = Σ_term w[s, term] · normalise_s(term)`` for each row's scenario ``s``."""

    def __init__(self, scenarios: Mapping[str, Mapping], heads: tuple[str, ...], eps: float = 1e-6):
        if not scenarios:
            raise ConfigError("reward map has no scenarios (use reward=unified or define reward.scenarios)")
        unknown = [s for s in scenarios if s not in SCENARIO_KINDS]
        if unknown:
            raise ConfigError(
                f"reward map names unknown scenario(s) {unknown}; known: {', '.join(SCENARIO_KINDS)}"
            )
        self.weights = torch.zeros(len(SCENARIO_KINDS), len(TERMS))
        self.values: dict[int, ValueExpression] = {}
        for name, spec in scenarios.items():
            spec = dict(spec)
            extra = set(spec) - {"weights", "value"}
            if extra:
                raise ConfigError(
                    f"reward.scenarios.{name}: unknown key(s) {sorted(extra)}; expected weights, value"
                )
            weights = dict(spec.get("weights") or {})
            bad = [t for t in weights if t not in TERMS]
            if bad:
                raise ConfigError(
                    f"reward.scenarios.{name}.weights: unknown term(s) {bad}; known: {', '.join(TERMS)}"
                )
            s = SCENARIO_KINDS.index(name)
            for term, weight in weights.items():
                self.weights[s, TERMS.index(term)] = float(weight)
            self.values[s] = ValueExpression(
                spec.get("value", heads[0]), heads, f"reward.scenarios.{name}.value"
            )
        self.covered = [SCENARIO_KINDS.index(s) for s in scenarios]
        self.eps = eps

    def check_covers(self, scenarios) -> None:
        missing = [s for s in scenarios if SCENARIO_KINDS.index(s) not in self.covered]
        if missing:
            raise ConfigError(f"reward map has no entry for trained scenario(s) {missing}")

    def __call__(
        self,
        scenario: torch.Tensor,
        legal: torch.Tensor,
        relevance: torch.Tensor,
        heads: Mapping[str, torch.Tensor],
        sids: torch.Tensor,
        logged_sid: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards ``[B, N]`` and raw components for ``N`` candidates per row (GT included by caller).

        ``legal [B, N]`` bool, ``relevance [B, N]``, ``heads[name] [B, N]``, ``sids [B, N, L]``,
        ``logged_sid [B, L]`` the SID of the item the user engaged with (None: no engagement term);
        ``present [B, N]`` which entries are candidates at all (spare beams of a small candidate pool
        are not): absent entries get reward 0 and count neither in diversity nor in normalisation.
        """
        b, n = legal.shape
        present = torch.ones_like(legal) if present is None else present.bool()
        ranking = torch.zeros(b, n)
        for s, expression in self.values.items():
            rows = scenario == s
            if rows.any():
                ranking[rows] = expression({k: v[rows] for k, v in heads.items()}).float()
        differ = (sids.unsqueeze(2) != sids.unsqueeze(1)).float().mean(-1)  # [B, N, N]
        others = present.unsqueeze(1) & present.unsqueeze(2) & ~torch.eye(n, dtype=torch.bool).unsqueeze(0)
        diversity = (differ * others).sum(-1) / others.sum(-1).clamp(min=1)
        raw = {
            "format": legal.float(),
            "relevance": relevance.float() * legal,
            "ranking": ranking * legal,
            "diversity": diversity * legal,
            "engagement": torch.zeros(b, n),
        }
        if logged_sid is not None:
            shared_prefix = (sids == logged_sid.unsqueeze(1)).long().cumprod(-1)
            raw["engagement"] = shared_prefix.float().mean(-1) * legal
        reward = torch.zeros(b, n)
        for s in scenario.unique().tolist():
            if s not in self.values:
                raise ConfigError(f"reward map has no entry for scenario {SCENARIO_KINDS[s]!r}")
            rows = scenario == s
            for t, term in enumerate(TERMS):
                weight = float(self.weights[s, t])
                if weight == 0.0:
                    continue
                values, counted = raw[term][rows], present[rows]
                mean, std = values[counted].mean(), values[counted].std(unbiased=False)
                normalised = (values - mean) / std if std > self.eps else torch.zeros_like(values)
                reward[rows] += weight * normalised * counted
        return reward, raw
