"""``OxygenPretrainModule``: unified multi-scenario pre-training of the generative recommender.

Loss (design brief §12): teacher-forced cross-entropy over the SID levels (mean over levels and
targets) plus ``λ · L_Q2I(q, ψ_i(target))``. Rows are either one (history, next item) pair each or,
by default on MovieLens, *dense*: a window of the user's sequence with a target after every slot,
all trained from one causal encoder pass (``OxygenModel``'s ``window_len``), each slot under its
own scenario instruction; ``train/targets`` logs how many targets a batch trained. Validation and test run trie-constrained beam
search (beam width per scenario from config; a channel's genre restricts the trie to its items,
as a business rule would) and rank the target by its position in the decoded list — a target the
beams never reach counts as a miss at every K. Metrics come from the shared harness
(:class:`~nestrec.evaluation.NextItemRecommender`), so they sit next to SASRec's on the same rows.

The SID registry travels with the model: its codes are a buffer, its version a hyper-parameter,
and loading a checkpoint whose registry differs from the data's refuses with a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from nestrec.data.scenarios import SCENARIO_KINDS
from nestrec.errors import ConfigError
from nestrec.evaluation import NextItemRecommender
from nestrec.oxygen.decoding import constrained_beam_search, items_from_beams
from nestrec.oxygen.losses import batch_variance, q2i_loss
from nestrec.oxygen.model import OxygenModel
from nestrec.oxygen.shared_memory_decoder import SharedMemoryDecoder
from nestrec.oxygen.sid import PrefixTrie, SIDRegistry
from nestrec.schedules import LRSchedule, with_schedule
from nestrec.sharding.item_embedding import ShardedItemEmbedding

__all__ = ["OxygenPretrainModule"]


class OxygenPretrainModule(NextItemRecommender):
    def __init__(
        self,
        num_items: int,
        registry_state: dict,
        text_dim: int,
        num_genres: int,
        profile_sizes: list[int],
        recent_len: int = 20,
        long_len: int = 100,
        genre_item_mask: torch.Tensor | None = None,
        d_model: int = 64,
        heads: int = 2,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        ffn: int = 128,
        dropout: float = 0.1,
        moe_experts: int = 0,
        moe_active: int = 2,
        igr: str = "semantic",
        igr_k: int = 10,
        igr_alpha: float = 1.0,
        igr_stop_grad: bool = True,
        instruction: str = "scenario_reasoning",
        instruction_position: str = "right_of_bos",
        q2i: bool = True,
        q2i_form: str = "paper",
        q2i_weight: float = 0.2,
        q2i_variance: float = 0.01,
        q2i_decorrelation: float = 0.01,
        q2i_grad: Literal["towers", "shared"] = "towers",
        embedding: str = "dense",
        sparse_optimizer: str = "adam",
        sparse_lr: float = 2e-3,
        sharding: str = "range",
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        beam: dict[str, int] | None = None,
        ks: tuple[int, ...] = (1, 5, 10, 20),
        exclude_history: bool = False,
        encoder_window: int = 0,
        user_trigger_items: int = 10,
        lr_schedule: LRSchedule = "constant",
        warmup_steps: int = 0,
        q2i_pairs: int = 1024,
        attention_dropout: float = 0.0,
        item_loss: float = 0.0,
        sid_distill: float = 0.0,
        embedding_init: Literal["scaled", "unit"] = "scaled",
        decoder_reads_state: bool = False,
    ):
        super().__init__(num_items, genre_item_mask, ks, exclude_history)
        self.save_hyperparameters(ignore=["genre_item_mask", "registry_state"])
        self.registry = SIDRegistry.from_state(registry_state)
        if self.registry.num_items != num_items:
            raise ConfigError(
                f"SID registry has {self.registry.num_items} items but the data has {num_items}"
            )
        self.hparams["registry_version"] = self.registry.version
        self.trie = self.registry.trie()
        beam = dict(beam or {})
        unknown = [s for s in beam if s not in SCENARIO_KINDS]
        if unknown:
            raise ConfigError(
                f"beam widths for unknown scenario(s) {unknown}; known: {', '.join(SCENARIO_KINDS)}"
            )
        self.beam = {s: int(beam.get(s, max(ks))) for s in SCENARIO_KINDS}
        if min(self.beam.values()) < 1:
            raise ConfigError(f"beam widths must be >= 1, got {self.beam}")
        if not 0.0 <= sid_distill <= 1.0:
            raise ConfigError(f"sid_distill is a mixing weight in [0, 1], got {sid_distill}")
        if sid_distill and not item_loss:
            raise ConfigError(
                "sid_distill needs the item head it distils from: set item_loss > 0 (dense rows)"
            )
        if embedding not in ("dense", "sharded"):
            raise ConfigError(f"unknown OxygenREC embedding {embedding!r}; expected dense or sharded")
        item_ids = (
            ShardedItemEmbedding(num_items, d_model, sparse_optimizer, sparse_lr, sharding, seed=0)
            if embedding == "sharded"
            else None
        )
        self.model = OxygenModel(
            self.registry.codes,
            self.registry.vocab_sizes,
            text_dim,
            len(SCENARIO_KINDS),
            num_genres,
            profile_sizes,
            d_model=d_model,
            heads=heads,
            encoder_layers=encoder_layers,
            decoder_layers=decoder_layers,
            ffn=ffn,
            dropout=dropout,
            recent_len=recent_len,
            long_len=long_len,
            igr=igr,
            igr_k=igr_k,
            igr_alpha=igr_alpha,
            igr_stop_grad=igr_stop_grad,
            instruction=instruction,
            instruction_position=instruction_position,
            item_id_embedding=item_ids,
            moe_experts=moe_experts,
            moe_active=moe_active,
            window_len=encoder_window,
            user_trigger_items=user_trigger_items,
            attention_dropout=attention_dropout,
            embedding_init=embedding_init,
            decoder_reads_state=decoder_reads_state,
        )

    # -- training ---------------------------------------------------------------------------------------
    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """NTP (+ Q2I) of a batch: one target per row, or (dense rows, ``targets [B, L]``) a target
        after every window slot, all from one encoder pass."""
        if "targets" in batch:
            return self._dense_losses(batch)
        encoded = self.model.encode(batch)
        return self._objective(
            encoded, batch["target"], batch.get("weight"), (encoded["i_s"], encoded["i_r"])
        )

    def _dense_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoded, target, rows, slots = self.dense_pairs(batch)
        weight = batch["weight"][rows, slots] if "weight" in batch else None
        return self._objective(encoded, target, weight, (encoded["i_s"], encoded["i_r"]))

    def dense_pairs(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder inputs for every (row, slot) with a target: ``(encoded, target [N], rows [N],
        slots [N])``. Slot ``j``'s memory is the causal state at ``j`` (items ``<= j``)
        plus the row's profile and IGR states; its instruction is its own scenario's."""
        if not self.model.window_len:
            raise ConfigError(
                "dense training rows need the causal encoder: build the model from the data module "
                "(encoder_window > 0), or use data.teacher_forcing=single"
            )
        states = self.model.encode_window(batch)
        targets = batch["targets"]
        rows, slots = (targets > 0).nonzero(as_tuple=True)
        index, pad = self.model.slot_memory_index(states, rows, slots)
        user = self.model.recent_mean(states["window"], states["window_reprs"])
        flat = {
            key: batch[key][rows, slots]
            for key in ("scenario", "trigger_item", "trigger_genre", "reasoning")
            if key in batch
        }
        i_s, i_r = self.model.instructions(flat, None if user is None else user[rows, slots])
        instr = self.model.fuse_instruction(torch.cat([i_s, i_r], -1))
        encoded = {
            "pad": pad,
            "instr": instr,
            "i_s": i_s,
            "i_r": i_r,
            "slot_state": states["states"][rows, states["prefix"] + slots],
            "scenario": flat["scenario"],
            "trigger_genre": flat["trigger_genre"],
        }
        if self.model.decodes_over_states:  # memory stays positions of the row's encoder states
            encoded.update(states=states["states"], memory_rows=rows, memory_index=index)
        else:
            encoded["memory"] = states["states"][rows.unsqueeze(1), index]
        return encoded, targets[rows, slots], rows, slots

    def _objective(
        self,
        encoded: dict[str, torch.Tensor],
        target: torch.Tensor,
        weight: torch.Tensor | None,
        instruction: tuple[torch.Tensor, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        sid = self.model.sid_codes[target]
        logits = self.model.sid_logits(encoded, sid)
        hard = torch.stack(
            [F.cross_entropy(lg, sid[:, level], reduction="none") for level, lg in enumerate(logits)]
        ).mean(0)
        per_sample, out = hard, {}
        # Dense training pairs carry their scenario (dense_pairs); one-target rows do not.
        if self.hparams.item_loss and "scenario" in encoded:
            # Auxiliary training signal (issue: allowed, never used for ranking): a full item-ID
            # softmax on the encoder's slot state, tied to the input item representations, trains
            # the encoder the way SASRec's causal loss does; the decoder then maps that state to SIDs.
            catalogue = self.model.item_repr(torch.arange(1, self.num_items + 1, device=target.device))
            item_log_probs = F.log_softmax(encoded["slot_state"] @ catalogue.t(), -1)
            item_ce = F.nll_loss(item_log_probs, target - 1)
            out["item_ce"] = item_ce
            if self.hparams.sid_distill:
                # The item head reads the encoder state only, not the instruction: it is a teacher
                # for homepage and related rows, for channel rows inside the channel's genre, and
                # none for search (the query names the target's genres and decade).
                scenario, genre = encoded["scenario"], encoded["trigger_genre"]
                channel = (genre >= 0).nonzero().flatten()  # as candidate_mask picks them
                restrict = None
                if len(channel) and self.genre_item_mask.numel():
                    restrict = channel, self.genre_item_mask[genre[channel]]
                soft = self._distillation_ce(item_log_probs.detach(), sid, logits, restrict)
                beta = self.hparams.sid_distill * (scenario != SCENARIO_KINDS.index("search"))
                per_sample = (1 - beta) * hard + beta * soft
                out["sid_distill"] = soft.mean()
        # Behaviour-weighted next-token loss: sum_b w_b * CE_b / sum_b w_b (uniform without weights).
        mean = (lambda x: (x * weight).sum() / weight.sum()) if weight is not None else torch.mean
        ntp = mean(per_sample)
        out.update(ntp=mean(hard), loss=ntp, targets=torch.tensor(float(len(target))))
        if "item_ce" in out:
            out["loss"] = ntp + self.hparams.item_loss * out["item_ce"]
        if self.hparams.q2i and self.hparams.instruction != "none":
            # towers: Q2I trains only the retrieval towers ψ_q / ψ_i (measured: with its gradient
            # in the shared item representations and instruction, the batch of target vectors
            # collapses and drags the encoder's item space with it); shared: the paper's path.
            towers = self.hparams.q2i_grad == "towers"
            i_s, i_r = (x.detach() for x in instruction) if towers else instruction
            q = self.model.query(i_s, i_r)
            if len(target) > self.hparams.q2i_pairs:
                # The variance / decorrelation terms are O(N^2) in the pairs: a random subset of a
                # dense batch's targets keeps them cheap (every pair still trains the NTP loss).
                keep = torch.randperm(len(target), device=target.device)[: self.hparams.q2i_pairs]
                q, target = q[keep], target[keep]
            t = self.model.item_vector(target, detach_items=towers)
            q2i, cosine = q2i_loss(
                q,
                t,
                self.hparams.q2i_form,
                self.hparams.q2i_variance,
                self.hparams.q2i_decorrelation,
            )
            out.update(q2i=q2i, q2i_cosine=cosine, loss=out["loss"] + self.hparams.q2i_weight * q2i)
            # Collapse watch: ~1/dim when item vectors are spread, → 0 when they all coincide.
            out["q2i_target_variance"] = batch_variance(t.detach())
            out["q2i_query_variance"] = batch_variance(q.detach())
        return out

    def _trie_on(self, device: torch.device) -> PrefixTrie:
        """The registry's trie with its transition table on ``device`` (moved once, then reused)."""
        if self.trie.child.device != device:
            self.trie.child = self.trie.child.to(device)
        return self.trie

    def _distillation_ce(
        self,
        item_log_probs: torch.Tensor,
        sid: torch.Tensor,
        level_logits: list[torch.Tensor],
        restrict: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-target cross-entropy of each SID level against the item head's own belief, ``[N]``.

        Why: measured on a trained checkpoint, beam search over the item softmax's SID marginals
        ranks as well as the item softmax itself (homepage HR@10 0.192 vs 0.189), while the
        decoder's one-hot-trained levels reach 0.122; the level-1 choice is nearly as good as the
        marginal's (top-5 0.58 vs 0.63), the loss is in the deeper levels. So each level ``l`` is
        also trained towards ``q_l(c) = P(code_l = c | the target's true prefix)`` under the
        (detached) item softmax ``item_log_probs [N, items]``, on the rows ``restrict = (rows,
        allowed [len(rows), items + 1] bool)`` names only over their allowed items (a channel's
        genre): the mass of the items below each child of the prefix's trie node.
        The generator stays a generator; it learns which sibling codes are plausible, not only
        the one that was watched."""
        device = item_log_probs.device
        trie, codes = self._trie_on(device), self.model.sid_codes
        if getattr(self, "_item_spans", (None,))[0] != device:  # one copy per device, not per step
            self._item_spans = (device, *(t.to(device) for t in trie.item_spans()))
        _, order, span = self._item_spans
        probs = item_log_probs.float().exp()
        if restrict is not None:
            rows, allowed = restrict
            probs[rows] = probs[rows] * allowed[:, 1:]
        node = torch.zeros(len(sid), dtype=torch.long, device=sid.device)
        losses = []
        for level, logits in enumerate(level_logits):
            if level == 0:  # every item is under the root: one product with the level-1 one-hot
                mass = probs @ F.one_hot(codes[1:, 0], logits.shape[1]).to(probs.dtype)
            else:  # the prefix's items are a short contiguous run of the SID order: gather it
                start, end = span[node, 0], span[node, 1]
                width = int((end - start).max())
                positions = start.unsqueeze(1) + torch.arange(width, device=sid.device)
                inside = positions < end.unsqueeze(1)
                items = order[positions.clamp(max=len(order) - 1)]
                under = probs.gather(1, items - 1) * inside
                mass = torch.zeros_like(logits, dtype=probs.dtype).scatter_add_(1, codes[items, level], under)
            total = mass.sum(1, keepdim=True)
            # Every item under the prefix underflowed (the head is far off): the one-hot target,
            # not a zero row that would drop this level's loss.
            one_hot = F.one_hot(sid[:, level], logits.shape[1]).to(mass.dtype)
            q = torch.where(total > 0, mass / total.clamp(min=1e-30), one_hot).to(logits.dtype)
            losses.append(-(q * F.log_softmax(logits, -1)).sum(1))
            node = trie.child[node, sid[:, level]]
        return torch.stack(losses).mean(0)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
        size = len(batch["history"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "loss"}, batch_size=size)
        return out["loss"]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        return with_schedule(optimizer, self.hparams.lr_schedule, self.hparams.warmup_steps, self)

    # -- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def recommend(
        self, batch: dict[str, torch.Tensor], beam: int, max_items: int, item_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top items ``[B, max_items]`` (0-padded) and scores by trie-constrained beam search."""
        encoded = self.model.encode(batch)
        # Keys / values of each row's memory projected once, not once per beam and level (the
        # serving decoder; the same logits as next_logits on the memory indexed per beam).
        decoder = SharedMemoryDecoder(self.model)
        prepared = decoder.prepare(encoded)

        def step(rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
            return decoder.next_logits(prepared, rows, prefix)

        result = constrained_beam_search(
            step, len(batch["target"]), self._trie_on(self.device), beam, item_mask
        )
        return items_from_beams(result, self.trie, max_items, item_mask)

    def _evaluate(self, batch: dict[str, torch.Tensor], metrics) -> None:
        scenarios = batch["scenario"].tolist()
        beam = max(self.beam[SCENARIO_KINDS[s]] for s in scenarios)
        items, _ = self.recommend(batch, beam, max(max(self.hparams.ks), beam), self.candidate_mask(batch))
        items = items.to(batch["target"].device)
        # A scenario's own beam width caps how deep its list goes.
        depth = torch.tensor([self.beam[SCENARIO_KINDS[s]] for s in scenarios], device=items.device)
        positions = torch.arange(items.shape[1], device=items.device).expand_as(items)
        hit = (items == batch["target"].unsqueeze(1)) & (positions < depth.unsqueeze(1))
        miss_rank = torch.full_like(batch["target"], self.num_items)
        ranks = torch.where(hit.any(1), hit.float().argmax(1), miss_rank)
        metrics.update(ranks, batch["scenario"], batch["index"])

    # -- registry travels with the checkpoint -----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sid_registry"] = self.registry.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("sid_registry")
        if stored is None:
            raise ConfigError("checkpoint has no SID registry: it was not written by OxygenPretrainModule")
        self.registry.check_version(stored["version"])

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            self.registry.save(Path(self.trainer.default_root_dir) / "sid_registry.json")
