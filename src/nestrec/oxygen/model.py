"""The OxygenREC fast-path network: encoder over the user, decoder over ``[BOS, INSTR, s1, s2, ...]``.

Encoder input (design brief §3, §12): ``[profile token; recent items; IGR-selected long-term
items]``; each item is its ID embedding plus the sum of its SID level embeddings. Instructions are
*not* fed to the encoder: they steer IGR (which long-term items are kept) and the decoder prefix.

Instruction token: ``I_s = MLP([scenario ; trigger])`` (trigger = an item's representation, a
genre embedding for a channel, or the learnable default ``z_def``) and ``I_r = adapter(text
vector)`` (a query or cached reasoning-instruction vector, else the learnable default), fused by
``INSTR = MLP([I_s ; I_r])``. ``instruction`` picks the ablation (``none`` / ``scenario`` /
``scenario_reasoning``) and ``instruction_position`` where the token goes (``right_of_bos``, the
paper's choice; ``replace_bos``; ``add_to_bos``).

IGR: ``q = normalize(ψ_q([I_s ; I_r]))``, long-term items scored by ``α·cos(q, ψ_i(item)) +
(1−α)·recency``, top-K kept; history vectors are detached by default (Q2I, not NTP, trains the
retrieval space, since top-K is not differentiable). ``igr=recent|random|none`` are the baselines.

Per-level heads predict ``s_l`` from the decoder state one position earlier.

**Two encoder contexts.** ``window_len = 0`` (one target per sample): the encoder reads
``[profile; recent_len recent items; IGR picks]`` bidirectionally and the decoder cross-attends to
all of it. ``window_len > 0`` (dense teacher forcing): the encoder reads ``[profile; IGR picks;
the last window_len items]`` with a causal mask over the window (the profile and IGR picks see only
each other), so the state at window slot ``j`` has seen items ``<= j`` only; the decoder for the
target after slot ``j`` cross-attends to ``[profile; IGR picks; states of slots j-recent_len+1..j]``. One encoder pass thus
trains a target at every slot, as SASRec's causal loss does, and at serving time the last slot's
state is the memory. IGR picks come from behaviour older than the whole window, steered by the
homepage instruction built from that older behaviour, so no slot's memory carries a later item.

**User-aware triggers.** A scenario without a trigger (homepage, search) used to get the learned
default ``z_def`` for every user, which made the homepage IGR query one global vector and pulled
every homepage Q2I target to one point. With ``user_trigger_items = k > 0`` such rows use the mean
representation of the user's last ``k`` items instead (``z_def`` when there are none); ``0`` keeps
the fixed default (the ablation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nestrec.errors import ConfigError, UserInputError
from nestrec.oxygen.moe import MoEDecoderLayer

__all__ = ["OxygenModel", "INSTRUCTION_MODES", "INSTRUCTION_POSITIONS", "IGR_MODES"]

#: ``SCENARIO_KINDS.index("homepage")`` (a literal: serving loads this module without the data
#: stack; tests/test_oxygen_dense.py checks the two agree)
SCENARIO_HOMEPAGE = 0

INSTRUCTION_MODES = ("none", "scenario", "scenario_reasoning")
INSTRUCTION_POSITIONS = ("right_of_bos", "replace_bos", "add_to_bos")
IGR_MODES = ("semantic", "recent", "random", "none")
# scaled: every embedding N(0, 1/d) (SASRec's); unit: PyTorch's N(0, 1) (the earlier behaviour)
EMBEDDING_INITS = ("scaled", "unit")


def _distinct_rows(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, inverse)``: one row index per distinct ``(history, profile)`` and, per row, which
    of them it is (``batch[...][first][inverse]`` gives back the batch's encoder inputs)."""
    key = batch["history"]
    if "profile" in batch:
        key = torch.cat([key, batch["profile"].to(key.dtype)], 1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(len(key), device=key.device)
    first = torch.full((int(inverse.max()) + 1 if len(key) else 0,), len(key), device=key.device)
    first = first.scatter_reduce(0, inverse, rows, "amin")
    return first, inverse


def _mlp(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, out), nn.GELU(), nn.Linear(out, out))


class OxygenModel(nn.Module):
    def __init__(
        self,
        sid_codes: torch.Tensor,
        vocab_sizes: list[int],
        text_dim: int,
        num_scenarios: int,
        num_genres: int,
        profile_sizes: list[int],
        d_model: int = 64,
        heads: int = 2,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        ffn: int = 128,
        dropout: float = 0.1,
        recent_len: int = 20,
        long_len: int = 100,
        igr: str = "semantic",
        igr_k: int = 10,
        igr_alpha: float = 1.0,
        igr_stop_grad: bool = True,
        instruction: str = "scenario_reasoning",
        instruction_position: str = "right_of_bos",
        q2i_dim: int = 64,
        item_id_embedding: nn.Module | None = None,
        moe_experts: int = 0,
        moe_active: int = 2,
        window_len: int = 0,
        user_trigger_items: int = 10,
        attention_dropout: float = 0.0,
        embedding_init: str = "scaled",
        decoder_reads_state: bool = False,
    ):
        super().__init__()
        if embedding_init not in EMBEDDING_INITS:
            raise ConfigError(
                f"unknown embedding_init {embedding_init!r}; expected one of {', '.join(EMBEDDING_INITS)}"
            )
        for name, value, allowed in (
            ("instruction", instruction, INSTRUCTION_MODES),
            ("instruction_position", instruction_position, INSTRUCTION_POSITIONS),
            ("igr", igr, IGR_MODES),
        ):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
        self.register_buffer("sid_codes", sid_codes.clamp(min=0), persistent=True)
        self.num_items = len(sid_codes) - 1
        self.vocab_sizes = list(vocab_sizes)
        self.recent_len, self.long_len = recent_len, long_len
        self.window_len, self.user_trigger_items = window_len, user_trigger_items
        self.igr, self.igr_k, self.igr_alpha, self.igr_stop_grad = (
            igr,
            (0 if igr == "none" else igr_k),
            igr_alpha,
            igr_stop_grad,
        )
        self.instruction, self.instruction_position = instruction, instruction_position
        if decoder_reads_state and not window_len:
            raise ConfigError(
                "decoder_reads_state needs the causal encoder's slot state (encoder_window > 0)"
            )
        self.decoder_reads_state = decoder_reads_state

        d = d_model
        self.item_id = (
            item_id_embedding
            if item_id_embedding is not None
            else nn.Embedding(self.num_items + 1, d, padding_idx=0)
        )
        self.item_levels = nn.ModuleList(nn.Embedding(v, d) for v in self.vocab_sizes)
        self.profile = nn.ModuleList(nn.Embedding(size + 1, d) for size in profile_sizes)
        self.profile_default = nn.Parameter(torch.zeros(d))
        context = window_len if window_len else recent_len
        self.enc_pos = nn.Embedding(1 + context + max(self.igr_k, 0), d)
        self.segment = nn.Embedding(3, d)  # profile / recent / retrieved
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, encoder_layers, enable_nested_tensor=False)
        self.enc_norm = nn.LayerNorm(d)

        self.scenario = nn.Embedding(num_scenarios, d)
        self.genre = nn.Embedding(num_genres + 1, d)
        self.z_def = nn.Parameter(torch.randn(d) * 0.02)  # default trigger
        self.r_def = nn.Parameter(torch.randn(d) * 0.02)  # default reasoning instruction
        self.reasoning_adapter = nn.Linear(text_dim, d)
        self.fuse_scenario = _mlp(2 * d, d)
        self.fuse_instruction = _mlp(2 * d, d)
        self.psi_q = nn.Linear(2 * d, q2i_dim)
        self.psi_i = nn.Linear(d, q2i_dim)

        self.bos = nn.Parameter(torch.randn(d) * 0.02)
        self.tokens = nn.ModuleList(nn.Embedding(v, d) for v in self.vocab_sizes)
        self.dec_pos = nn.Embedding(2 + len(self.vocab_sizes), d)
        if moe_experts:  # MoE capacity goes to the decoder, as in the paper's larger models
            dec_layer = MoEDecoderLayer(d, heads, ffn, dropout, moe_experts, moe_active)
        else:
            dec_layer = nn.TransformerDecoderLayer(d, heads, ffn, dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(dec_layer, decoder_layers)
        self.dec_norm = nn.LayerNorm(d)
        # Dropout on attention weights (nn.Transformer*Layer's default: the same p as elsewhere) cost
        # a fifth of a dense CPU step in Bernoulli draws and forces SDPA's slow math kernel; SASRec
        # trains without it too. Residual / FFN dropout stays.
        for block in (*self.encoder.layers, *self.decoder.layers):
            for attention in (getattr(block, "self_attn", None), getattr(block, "multihead_attn", None)):
                if attention is not None:
                    attention.dropout = attention_dropout
        self.heads = nn.ModuleList(nn.Linear(d, v) for v in self.vocab_sizes)
        if embedding_init == "scaled":
            self._scale_embeddings(d, injected=item_id_embedding)

    def _scale_embeddings(self, d: int, injected: nn.Module | None) -> None:
        """Every embedding table of this model drawn from N(0, 1/d), as SASRec's item table is.

        PyTorch's default N(0, 1) gives an item representation (ID + 4 SID levels) of norm ~18 at
        d = 64: the tied item-softmax starts with logits of std ~18 (a near one-hot, saturated
        softmax) and Adam's ~lr-sized steps barely move rows of that scale, so rarely-seen items
        keep their random start. A table passed in (the row-sharded one) keeps its own init."""
        keep = {id(m) for m in injected.modules()} if injected is not None else set()
        for module in self.modules():
            if isinstance(module, nn.Embedding) and id(module) not in keep:
                nn.init.normal_(module.weight, std=d**-0.5)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()

    # -- pieces ---------------------------------------------------------------------------------------
    def item_repr(self, items: torch.Tensor) -> torch.Tensor:
        """ID embedding + Σ SID level embeddings; zero for padding (item 0)."""
        codes = self.sid_codes[items]
        x = self.item_id(items)
        for level, table in enumerate(self.item_levels):
            x = x + table(codes[..., level])
        return x * (items > 0).unsqueeze(-1)

    def instructions(
        self, batch: dict[str, torch.Tensor], user: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(I_s, I_r), each ``[N, d]``, for flat ``scenario`` / ``trigger_*`` / ``reasoning`` rows.

        ``user`` (``[N, d]``, NaN-free; see :meth:`recent_mean`) replaces the default trigger on rows
        without one; ``None`` keeps ``z_def``.
        """
        b = len(batch["scenario"])
        trigger_item, trigger_genre = batch["trigger_item"], batch["trigger_genre"]
        trigger = self.z_def.expand(b, -1) if user is None else user
        has_item, has_genre = trigger_item > 0, trigger_genre >= 0
        trigger = torch.where(has_item.unsqueeze(-1), self.item_repr(trigger_item), trigger)
        trigger = torch.where(has_genre.unsqueeze(-1), self.genre(trigger_genre.clamp(min=0)), trigger)
        i_s = self.fuse_scenario(torch.cat([self.scenario(batch["scenario"]), trigger], -1))
        i_r = self.r_def.expand(b, -1)
        if self.instruction == "scenario_reasoning" and "reasoning" in batch:
            has_text = batch["reasoning"].abs().sum(-1) > 0
            i_r = torch.where(has_text.unsqueeze(-1), self.reasoning_adapter(batch["reasoning"]), i_r)
        return i_s, i_r

    def recent_mean(self, items: torch.Tensor, reprs: torch.Tensor | None = None) -> torch.Tensor | None:
        """The user-aware trigger at every slot: mean representation of the last
        ``user_trigger_items`` non-padding items up to and including the slot, ``[B, L, d]``
        (``z_def`` where there are none); ``None`` when user triggers are off.

        Running sums make it one pass for all slots; slot ``j`` reads items ``<= j`` only.
        """
        k = self.user_trigger_items
        if not k:
            return None
        reprs = self.item_repr(items) if reprs is None else reprs
        present = (items > 0).to(reprs.dtype).unsqueeze(-1)
        sums = torch.cumsum(reprs, 1)
        counts = torch.cumsum(present, 1)
        if items.shape[1] > k:
            sums = sums - F.pad(sums[:, :-k], (0, 0, k, 0))
            counts = counts - F.pad(counts[:, :-k], (0, 0, k, 0))
        mean = sums / counts.clamp(min=1)
        return torch.where(counts > 0, mean, self.z_def)

    def query(self, i_s: torch.Tensor, i_r: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.psi_q(torch.cat([i_s, i_r], -1)), dim=-1)

    def item_vector(self, items: torch.Tensor, detach_items: bool = False) -> torch.Tensor:
        """The shared item tower ψ_i (targets and history live in the same space as queries);
        ``detach_items`` keeps the caller's gradient out of the item representations."""
        reprs = self.item_repr(items)
        return F.normalize(self.psi_i(reprs.detach() if detach_items else reprs), dim=-1)

    def retrieve(self, long_items: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """IGR: the ``igr_k`` long-term items to keep, ``[B, K]`` (0 = nothing)."""
        if self.igr_k == 0 or long_items.shape[1] == 0:
            return long_items[:, :0]
        present = long_items > 0
        recency = torch.linspace(0, 1, long_items.shape[1], device=long_items.device).expand_as(long_items)
        if self.igr == "semantic":
            h = self.item_vector(long_items)
            if self.igr_stop_grad:
                h = h.detach()
            semantic = (h @ q.unsqueeze(-1)).squeeze(-1)
            score = self.igr_alpha * semantic + (1 - self.igr_alpha) * recency
        elif self.igr == "recent":
            score = recency
        else:  # random, reproducible per (row, position)
            g = torch.Generator(device="cpu").manual_seed(int(long_items.sum()) % (2**31))
            score = torch.rand(long_items.shape, generator=g).to(long_items.device)
        score = score.masked_fill(~present, float("-inf"))
        k = min(self.igr_k, long_items.shape[1])
        top, index = score.topk(k, dim=1)
        return long_items.gather(1, index).masked_fill(torch.isinf(top), 0)

    def check_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Ids outside the catalogue or scenario table would index garbage: name them instead."""
        for key in ("history", "trigger_item"):
            values = batch[key]
            if values.numel() and (int(values.min()) < 0 or int(values.max()) > self.num_items):
                bad = values[(values < 0) | (values > self.num_items)][0]
                raise UserInputError(
                    f"{key} holds item id {int(bad)}, outside the catalogue 1..{self.num_items} (0 = padding)"
                )
        scenarios = batch["scenario"]
        if scenarios.numel() and (
            int(scenarios.min()) < 0 or int(scenarios.max()) >= self.scenario.num_embeddings
        ):
            raise UserInputError(
                f"scenario index {int(scenarios.max())} is outside the model's {self.scenario.num_embeddings} scenarios"
            )

    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoder memory, instruction and query of each row (its one target: the next item)."""
        if self.window_len:
            # Evaluation rows come in groups that share a history (one per scenario of a user):
            # the causal encoder runs once per distinct (history, profile), the instructions per row.
            self.check_batch(batch)  # every row: the encoder below sees one row per history
            first, inverse = _distinct_rows(batch)
            b = len(batch["history"])
            rowwise = {
                k: v[first] for k, v in batch.items() if torch.is_tensor(v) and v.dim() and len(v) == b
            }
            states = self.encode_window(rowwise)
            user = self.recent_mean(states["window"], states["window_reprs"])
            i_s, i_r = self.instructions(batch, None if user is None else user[inverse, -1])
            last = torch.full(
                (b,), states["window"].shape[1] - 1, dtype=torch.long, device=states["pad"].device
            )
            memory, pad = self.slot_memory(states, inverse, last)
            instr = self.fuse_instruction(torch.cat([i_s, i_r], -1))
            return {
                "memory": memory,
                "pad": pad,
                "instr": instr,
                "q": self.query(i_s, i_r),
                "i_s": i_s,
                "i_r": i_r,
                "retrieved": states["retrieved"][inverse],
                "slot_state": memory[:, -1],
            }
        self.check_batch(batch)
        history = batch["history"]
        long_items, recent = history[:, : -self.recent_len], history[:, -self.recent_len :]
        long_items = long_items[:, -self.long_len :] if self.long_len else long_items[:, :0]
        user = self.recent_mean(recent)
        i_s, i_r = self.instructions(batch, None if user is None else user[:, -1])
        q = self.query(i_s, i_r)
        retrieved = self.retrieve(long_items, q)
        b = len(history)
        items = torch.cat([recent, retrieved], 1)
        x = torch.cat([self._profile(batch, b).unsqueeze(1), self.item_repr(items)], 1)
        segments = torch.cat(
            [
                torch.zeros(b, 1, dtype=torch.long, device=x.device),
                torch.ones_like(recent),
                torch.full_like(retrieved, 2),
            ],
            1,
        )
        x = x + self.segment(segments) + self.enc_pos(torch.arange(x.shape[1], device=x.device))
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=x.device), items == 0], 1)
        memory = self.enc_norm(self.encoder(x, src_key_padding_mask=pad))
        instr = self.fuse_instruction(torch.cat([i_s, i_r], -1))
        return {
            "memory": memory,
            "pad": pad,
            "instr": instr,
            "q": q,
            "i_s": i_s,
            "i_r": i_r,
            "retrieved": retrieved,
        }

    def _profile(self, batch: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        if self.profile and "profile" in batch:
            return sum(table(batch["profile"][:, i]) for i, table in enumerate(self.profile))
        return self.profile_default.expand(b, -1)

    def encode_window(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Causal encoder states of ``[profile; IGR picks; window]`` (``window_len > 0`` only).

        Returns ``states [B, S, d]``, ``pad [B, S]``, ``prefix`` (the number of profile + IGR slots,
        a Python int), ``window [B, L]``, its item representations ``window_reprs [B, L, d]`` and
        ``retrieved [B, K]``.
        """
        self.check_batch(batch)
        history = batch["history"]
        window = history[:, -self.window_len :]
        pool = history[:, : -self.window_len] if history.shape[1] > self.window_len else history[:, :0]
        pool = pool[:, -self.long_len :] if self.long_len else pool[:, :0]
        b, device = len(history), history.device
        # IGR: the homepage instruction of the behaviour *before* the window (leak-free for every slot)
        if self.igr_k and pool.shape[1]:
            home = torch.full((b,), SCENARIO_HOMEPAGE, dtype=torch.long, device=device)
            none = torch.zeros(b, dtype=torch.long, device=device)
            user = self.recent_mean(pool)
            i_s, i_r = self.instructions(
                {"scenario": home, "trigger_item": none, "trigger_genre": none - 1},
                None if user is None else user[:, -1],
            )
            retrieved = self.retrieve(pool, self.query(i_s, i_r))
        else:
            retrieved = pool[:, :0]
        items = torch.cat([retrieved, window], 1)
        reprs = self.item_repr(items)
        x = torch.cat([self._profile(batch, b).unsqueeze(1), reprs], 1)
        prefix = 1 + retrieved.shape[1]
        segments = torch.cat(
            [
                torch.zeros(b, 1, dtype=torch.long, device=device),
                torch.full_like(retrieved, 2),
                torch.ones_like(window),
            ],
            1,
        )
        x = x + self.segment(segments) + self.enc_pos(torch.arange(x.shape[1], device=device))
        s = x.shape[1]
        blocked = torch.ones(s, s, dtype=torch.bool, device=device).triu(1)  # window slots: causal
        blocked[:prefix, prefix:] = True  # profile / IGR picks never read the window
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=device), items == 0], 1)
        states = self.enc_norm(self.encoder(x, mask=blocked, src_key_padding_mask=pad))
        return {
            "states": states,
            "pad": pad,
            "prefix": prefix,
            "window": window,
            "window_reprs": reprs[:, retrieved.shape[1] :],  # reused by the user-aware trigger
            "retrieved": retrieved,
        }

    def slot_memory_index(
        self, states: dict[str, torch.Tensor], rows: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which encoder positions the decoder of each (row, window slot) pair reads,
        ``[N, prefix + recent_len]`` (the row's profile and IGR positions, then the ``recent_len``
        slots ending at the slot, oldest first; the last one is the slot itself), and the padding
        mask of those positions (True = not read)."""
        prefix = states["prefix"]
        back = torch.arange(self.recent_len - 1, -1, -1, device=slots.device)
        recent = slots.unsqueeze(1) - back  # [N, R], oldest first
        before_window = recent < 0
        index = torch.cat(
            [torch.arange(prefix, device=slots.device).expand(len(slots), -1), prefix + recent.clamp(min=0)],
            1,
        )
        pad = states["pad"][rows.unsqueeze(1), index]
        pad[:, prefix:] |= before_window
        pad[:, -1] = False  # the slot's own state always conditions the decoder (even an empty history)
        return index, pad

    def slot_memory(
        self, states: dict[str, torch.Tensor], rows: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder memory ``[N, prefix + recent_len, d]`` for (row, window slot) pairs: the row's
        profile and IGR states plus the causal states of the ``recent_len`` slots ending at the
        slot (each has seen items up to itself only), and its padding mask.

        The decoder thus reads individual recent items, as in the one-target encoder, but from
        states that saw the whole window before them."""
        index, pad = self.slot_memory_index(states, rows, slots)
        return states["states"][rows.unsqueeze(1), index], pad

    # -- decoder --------------------------------------------------------------------------------------
    def decoder_prefix(self, instr: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's leading positions before any SID token: BOS and/or the instruction vector,
        as ``instruction_position`` places them (public: the serving decoder builds on it).

        With ``decoder_reads_state`` the BOS position also carries the encoder's slot ``state``
        (``[N, d]``): the item head ranks from that one vector, and the decoder otherwise reaches
        it only through cross-attention over all memory slots."""
        b = len(instr)
        bos = self.bos.expand(b, -1)
        if self.decoder_reads_state:
            if state is None:
                raise ConfigError(
                    "this decoder starts from the encoder's slot state: pass encoded['slot_state']"
                )
            bos = bos + state
        if self.instruction == "none":
            return bos.unsqueeze(1)
        if self.instruction_position == "replace_bos":
            return instr.unsqueeze(1)
        if self.instruction_position == "add_to_bos":
            return (bos + instr).unsqueeze(1)
        return torch.stack([bos, instr], 1)

    def decode(self, encoded: dict[str, torch.Tensor], sid_prefix: torch.Tensor) -> torch.Tensor:
        """Decoder states ``[N, P + l, d]`` for SID prefix tokens ``[N, l]``."""
        prefix = self.decoder_prefix(encoded["instr"], encoded.get("slot_state"))
        parts = [prefix] + [self.tokens[i](sid_prefix[:, i]).unsqueeze(1) for i in range(sid_prefix.shape[1])]
        x = torch.cat(parts, 1)
        x = x + self.dec_pos(torch.arange(x.shape[1], device=x.device))
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=torch.bool)
        if "memory" not in encoded:  # dense training: memory given as positions of the encoder states
            return self.dec_norm(self._decode_over_states(x, causal, encoded))
        out = self.decoder(
            x, encoded["memory"], tgt_mask=causal, memory_key_padding_mask=encoded["pad"], tgt_is_causal=True
        )
        return self.dec_norm(out)

    @property
    def decodes_over_states(self) -> bool:
        """Whether the decoder is the pre-norm ``nn.TransformerDecoderLayer`` stack (MoE layers
        included: they only replace the feed-forward block) that :meth:`_decode_over_states` and
        the shared-memory beam decoder re-implement: no final decoder norm, packed batch-first
        attention without extra key/value biases. Otherwise dense training materialises memory."""
        if getattr(self.decoder, "norm", None) is not None:
            return False
        for layer in self.decoder.layers:
            mha = getattr(layer, "multihead_attn", None)
            if not (isinstance(layer, nn.TransformerDecoderLayer) and layer.norm_first and mha is not None):
                return False
            if (
                mha.bias_k is not None
                or mha.add_zero_attn
                or not mha._qkv_same_embed_dim
                or not mha.batch_first
            ):
                return False
        return True

    def _decode_over_states(
        self, x: torch.Tensor, causal: torch.Tensor, encoded: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``nn.TransformerDecoder``'s pre-norm layers, with cross-attention keys and values
        projected once per encoder position, not once per (target, memory slot).

        Why: a dense row's ~100 targets each read 31 memory slots, almost all shared with the
        row's other targets; projecting the gathered ``[N, 31, d]`` memory in every layer (and
        ``nn.MultiheadAttention``'s packing copies and their zero-filled gradients) was about a
        third of a training step. Here each layer projects ``states [B, S, d]`` and gathers the
        projected keys/values of every target's ``memory_index`` — the same arithmetic."""
        states, rows, index = encoded["states"], encoded["memory_rows"], encoded["memory_index"]
        n, length, d = x.shape
        attend = (~encoded["pad"]).view(n, 1, 1, -1)
        for layer in self.decoder.layers:
            x = x + layer._sa_block(layer.norm1(x), causal, None, True)
            mha = layer.multihead_attn
            heads, bias = mha.num_heads, mha.in_proj_bias
            q = F.linear(layer.norm2(x), mha.in_proj_weight[:d], None if bias is None else bias[:d])
            kv = F.linear(states, mha.in_proj_weight[d:], None if bias is None else bias[d:])
            kv = kv[rows.unsqueeze(1), index].view(n, index.shape[1], 2, heads, d // heads)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # [N, heads, M, head_dim] each
            q = q.view(n, length, heads, d // heads).transpose(1, 2)
            dropout = mha.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)
            x = x + layer.dropout2(mha.out_proj(out.transpose(1, 2).reshape(n, length, d)))
            x = x + layer._ff_block(layer.norm3(x))
        return x

    def sid_logits(self, encoded: dict[str, torch.Tensor], target_sid: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced logits of every level: ``[B, vocab_l]`` each."""
        states = self.decode(encoded, target_sid[:, :-1])
        offset = states.shape[1] - target_sid.shape[1]
        return [head(states[:, offset + level]) for level, head in enumerate(self.heads)]

    def next_logits(self, encoded: dict[str, torch.Tensor], sid_prefix: torch.Tensor) -> torch.Tensor:
        """Logits of level ``sid_prefix.shape[1]`` (beam search step)."""
        states = self.decode(encoded, sid_prefix)
        return self.heads[sid_prefix.shape[1]](states[:, -1])
