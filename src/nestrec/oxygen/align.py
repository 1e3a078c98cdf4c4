"""``SAGCPOModule``: post-training the pre-trained generator against the unified reward map.

Per batch (design brief §12): snapshot the old policy (refreshed every ``refresh_every`` steps);
without gradients, roll out ``G`` candidates per request from it (trie-constrained beam search, or
sampling — constrained, or unconstrained to exercise the format reward); score them and the
ground-truth item with the frozen ranker through the reward map; group-normalise; then take
``inner_updates`` optimiser steps on the policy objective of ``method`` (GRPO, GSPO, SAPO or
SA-GCPO, :mod:`nestrec.oxygen.policy`) plus an NTP anchor on the ground truth (OneRec-style, in
place of a KL to a reference model; ``anchor_weight`` 0 turns it off).

Choices (open questions in the brief, all configurable): log-probabilities are the model's raw
(unmasked) per-level softmax; dropout is off during RL so the first inner step sees ratio 1
exactly; ``R*`` is the reward map applied to the ground-truth item, normalised with the group.
Evaluation (per-scenario HR/Recall/NDCG@K by beam search) is inherited unchanged, so pre-training
and post-training numbers come from the same code on the same rows.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from nestrec.data.scenarios import SCENARIO_KINDS
from nestrec.errors import ConfigError
from nestrec.oxygen.decoding import constrained_beam_search
from nestrec.oxygen.module import OxygenPretrainModule
from nestrec.oxygen.policy import METHODS, group_advantages, group_clip, policy_loss
from nestrec.oxygen.ranker import HEADS, UnifiedRankerModule
from nestrec.oxygen.reward import UnifiedRewardMap

__all__ = ["ROLLOUTS", "SAGCPOModule"]

ROLLOUTS = ("beam", "sample", "sample_unconstrained")


class SAGCPOModule(OxygenPretrainModule):
    def __init__(
        self,
        *args,
        method: str = "sagcpo",
        group_size: int = 8,
        rollout: str = "beam",
        temperature: float = 1.0,
        inner_updates: int = 2,
        refresh_every: int = 1,
        clip_eps: float = 0.2,
        seq_clip_eps: float = 3e-4,
        tau_pos: float = 1.0,
        tau_neg: float = 1.05,
        anchor_weight: float = 0.3,
        include_logged: bool = True,
        rl_lr: float = 3e-5,
        max_grad_norm: float = 1.0,
        reward_scenarios: dict | None = None,
        item_text: torch.Tensor | None = None,
        ranker: UnifiedRankerModule | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["genre_item_mask", "registry_state", "item_text", "ranker"])
        if method not in METHODS:
            raise ConfigError(f"unknown policy method {method!r}; known: {', '.join(METHODS)}")
        if rollout not in ROLLOUTS:
            raise ConfigError(f"unknown rollout {rollout!r}; known: {', '.join(ROLLOUTS)}")
        if group_size < 2:
            raise ConfigError(
                f"group_size must be >= 2 (advantages are relative within a group), got {group_size}"
            )
        self.automatic_optimization = False
        self.reward_map = UnifiedRewardMap(reward_scenarios or {}, HEADS)
        self.ranker = ranker
        if ranker is not None:
            ranker.requires_grad_(False).eval()
        text = item_text if item_text is not None else torch.zeros(self.num_items + 1, 1)
        self.register_buffer("item_text", F.normalize(text.float(), dim=-1), persistent=False)
        self._old: list[torch.nn.Module] = []  # a list keeps the snapshot out of state_dict / parameters
        self._updates = 0

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.rl_lr)

    # -- rollouts -----------------------------------------------------------------------------------
    def _step_fn(self, model, encoded):
        def step(rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
            return model.next_logits({k: v[rows] for k, v in encoded.items()}, prefix)

        return step

    @torch.no_grad()
    def rollout(self, model, encoded, batch, item_mask):
        """Candidates ``tokens [B, G, L]``, ``items [B, G]`` (0 = illegal) and ``valid [B, G]``."""
        b, g = len(batch["target"]), self.hparams.group_size
        if self.trie.child.device != self.device:
            self.trie.child = self.trie.child.to(self.device)
        step = self._step_fn(model, encoded)
        if self.hparams.rollout == "beam":
            result = constrained_beam_search(step, b, self.trie, g, item_mask)
            valid = result.leaves >= 0
            # Fewer legal SIDs than beams: the spare beams are padding (masked out of the loss).
            tokens, leaves = result.tokens * valid.unsqueeze(-1), result.leaves
        else:
            tokens, leaves, valid = self._sample(step, b, g, item_mask)
        items = self._leaf_items(leaves, item_mask)
        return tokens, items, valid

    def _sample(self, step, b: int, g: int, item_mask):
        constrained = self.hparams.rollout == "sample"
        allowed = self.trie.allowed_nodes(item_mask) if (item_mask is not None and constrained) else None
        n = b * g
        rows = torch.arange(b, device=self.device).repeat_interleave(g)
        node = torch.zeros(n, dtype=torch.long, device=self.device)
        alive = torch.ones(n, dtype=torch.bool, device=self.device)
        tokens = torch.zeros(n, 0, dtype=torch.long, device=self.device)
        width = self.trie.child.shape[1]
        for _ in range(self.trie.depth):
            logits = step(rows, tokens).float() / self.hparams.temperature
            logits = F.pad(logits, (0, max(0, width - logits.shape[1])), value=float("-inf"))[:, :width]
            children = self.trie.child[node.clamp(min=0)]
            if constrained:
                legal = children >= 0
                if allowed is not None:
                    legal &= allowed[rows].gather(1, children.clamp(min=0))
                logits = logits.masked_fill(~legal, float("-inf"))
            token = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
            nxt = children.gather(1, token.unsqueeze(1)).squeeze(1)
            alive &= nxt >= 0
            node = torch.where(alive, nxt, torch.zeros_like(nxt))
            tokens = torch.cat([tokens, token.unsqueeze(1)], 1)
        leaves = torch.where(alive, node, torch.full_like(node, -1))
        return tokens.view(b, g, -1), leaves.view(b, g), alive.view(b, g)

    def _with_logged_item(self, batch, tokens, items, valid):
        """Put the logged item in each group (replacing the last candidate unless already present).

        Why: with ``R*`` = the logged item's reward, a group that never contains it can only get
        its positive advantages clipped — measured on ML-1M, 99 % were, and a negative-only signal
        pushes probability onto junk until the policy collapses (the "squeezing effect"). With the
        logged item in the group there is always one candidate at ``R*`` whose credit survives.
        """
        target = batch["target"]
        present = (items == target.unsqueeze(1)).any(1)
        slot = torch.full_like(target, items.shape[1] - 1)
        rows = (~present).nonzero().squeeze(1)
        tokens, items, valid = tokens.clone(), items.clone(), valid.clone()
        tokens[rows, slot[rows]] = self.model.sid_codes[target[rows]]
        items[rows, slot[rows]] = target[rows]
        valid[rows, slot[rows]] = True
        return tokens, items, valid

    def _leaf_items(self, leaves: torch.Tensor, item_mask) -> torch.Tensor:
        """The item each leaf decodes to (the most popular allowed one); 0 for illegal leaves."""
        out = torch.zeros_like(leaves)
        mask = item_mask.cpu() if item_mask is not None else None
        for r, row in enumerate(leaves.tolist()):
            for c, leaf in enumerate(row):
                members = self.trie.leaf_items[leaf] if leaf >= 0 else []
                allowed = [i for i in members if mask is None or bool(mask[r, i])]
                out[r, c] = allowed[0] if allowed else 0
        return out

    # -- rewards ------------------------------------------------------------------------------------
    def context_vectors(self, batch) -> torch.Tensor:
        """What relevance compares items with: query (search), trigger (related), recent centroid."""
        recent = batch["history"][:, -10:]
        centroid = F.normalize(self.item_text[recent].sum(1), dim=-1)
        context = centroid
        search, related = SCENARIO_KINDS.index("search"), SCENARIO_KINDS.index("related")
        if "reasoning" in batch and batch["reasoning"].shape[-1] == self.item_text.shape[-1]:
            query = F.normalize(batch["reasoning"].float(), dim=-1)
            context = torch.where((batch["scenario"] == search).unsqueeze(-1), query, context)
        trigger = self.item_text[batch["trigger_item"].clamp(min=0)]
        return torch.where((batch["scenario"] == related).unsqueeze(-1), trigger, context)

    @torch.no_grad()
    def rewards(self, batch, items, tokens, valid, produced=None):
        """Rewards ``[B, G]``, the ground truth's ``R* [B]`` and raw components (GT column last)."""
        if self.ranker is None:
            raise ConfigError("SAGCPOModule needs a trained ranker (the ranker stage) to score rollouts")
        self.ranker.eval()
        target = batch["target"]
        all_items = torch.cat([items, target.unsqueeze(1)], 1)
        all_tokens = torch.cat([tokens, self.model.sid_codes[target].unsqueeze(1)], 1)
        all_valid = torch.cat([valid & (items > 0), torch.ones_like(valid[:, :1])], 1)
        heads = self.ranker.predict(batch, all_items)
        relevance = (self.item_text[all_items] * self.context_vectors(batch).unsqueeze(1)).sum(-1)
        reward, raw = self.reward_map(
            batch["scenario"].cpu(),
            all_valid.cpu(),
            relevance.cpu(),
            {k: v.cpu() for k, v in heads.items()},
            all_tokens.cpu(),
            self.model.sid_codes[target].cpu(),
            None if produced is None else torch.cat([produced, torch.ones_like(produced[:, :1])], 1).cpu(),
        )
        reward = reward.to(self.device)
        return reward[:, :-1], reward[:, -1], {k: v.to(self.device) for k, v in raw.items()}

    # -- training -----------------------------------------------------------------------------------
    def sequence_logp(self, model, encoded, tokens: torch.Tensor) -> torch.Tensor:
        """Per-level log-probabilities ``[B, G, L]`` of candidate SIDs under ``model``."""
        b, g, depth = tokens.shape
        expanded = {k: v.repeat_interleave(g, 0) for k, v in encoded.items()}
        flat = tokens.reshape(b * g, depth)
        logits = model.sid_logits(expanded, flat)
        logp = torch.stack(
            [
                torch.log_softmax(lg.float(), -1).gather(1, flat[:, i : i + 1]).squeeze(1)
                for i, lg in enumerate(logits)
            ],
            1,
        )
        return logp.view(b, g, depth)

    def on_train_epoch_start(self) -> None:
        self.model.eval()  # dropout off throughout RL (ratio = 1 exactly before the first update)
        if self.ranker is not None:
            self.ranker.eval()

    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        self.model.eval()
        if not self._old or self._updates % hp.refresh_every == 0:
            self._old = [copy.deepcopy(self.model).requires_grad_(False)]
        old = self._old[0]
        item_mask = self.candidate_mask(batch)
        with torch.no_grad():
            old_encoded = old.encode(batch)
            tokens, items, valid = self.rollout(old, old_encoded, batch, item_mask)
            # Beam search may have fewer legal SIDs than beams (a small channel): spare beams are not
            # candidates at all. Every sample is a candidate, legal or not.
            produced = valid if hp.rollout == "beam" else torch.ones_like(valid)
            legal_rate = ((items > 0) & produced).float().sum() / produced.float().sum().clamp(min=1)
            hit = (items == batch["target"].unsqueeze(1)).any(1).float().mean()
            if hp.include_logged:
                tokens, items, valid = self._with_logged_item(batch, tokens, items, valid)
            produced = produced | (items == batch["target"].unsqueeze(1))  # the logged item's slot
            reward, gt_reward, raw = self.rewards(batch, items, tokens, valid, produced)
            # Unconstrained samples stay in the group even when illegal: the format reward teaches.
            valid = torch.ones_like(valid) if hp.rollout == "sample_unconstrained" else valid & (items > 0)
            advantages = group_advantages(reward, valid)
            suppressed = torch.zeros_like(valid)
            if hp.method == "sagcpo":
                advantages, suppressed = group_clip(advantages, reward, gt_reward)
            old_logp = self.sequence_logp(old, old_encoded, tokens)
        optimizer = self.optimizers()
        gt_sid = self.model.sid_codes[batch["target"]]
        for _ in range(hp.inner_updates):
            encoded = self.model.encode(batch)
            logp = self.sequence_logp(self.model, encoded, tokens)
            loss, stats = policy_loss(
                logp,
                old_logp,
                advantages,
                hp.method,
                valid,
                hp.clip_eps,
                hp.seq_clip_eps,
                hp.tau_pos,
                hp.tau_neg,
            )
            anchor = torch.stack(
                [
                    F.cross_entropy(lg, gt_sid[:, i])
                    for i, lg in enumerate(self.model.sid_logits(encoded, gt_sid))
                ]
            ).mean()
            total = loss + hp.anchor_weight * anchor
            optimizer.zero_grad()
            self.manual_backward(total)
            if hp.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), hp.max_grad_norm)
            optimizer.step()
        self._updates += 1
        size = len(batch["target"])
        positive = (group_advantages(reward, valid) > 0) & valid
        logs = {
            "rl/loss": loss.detach(),
            "rl/anchor_ntp": anchor.detach(),
            "rl/reward": (reward * valid).sum() / valid.sum().clamp(min=1),
            "rl/gt_reward": gt_reward.mean(),
            "rl/legal_rate": legal_rate,
            "rl/rollout_hit": hit,
            "rl/suppressed_fraction": suppressed.float().sum() / positive.float().sum().clamp(min=1),
            **{f"rl/{k}": v for k, v in stats.items()},
            **{f"rl/reward_{k}": v[:, :-1].mean() for k, v in raw.items()},
        }
        self.log("rl/reward", logs.pop("rl/reward"), prog_bar=True, batch_size=size)
        self.log_dict(logs, batch_size=size)
