"""Learned tokens (docs/method.md#tokens) and E(·), the text embedding the triplet losses compare (docs/method.md#e-the-text-embedding).

Per concept i: an instance-specific token `<*i>`, a concept-specific token `<&i>` and one intrinsic token per
anchor (`<#i>`, `<%i>`, `<$i>`, `<!i>` for the first to fourth anchor). The new rows live in one trainable
tensor appended to the frozen vocabulary (`ExtendedEmbedding`), so only they can train; which of them train
in a phase is set by a row mask on their gradient (the others are also restored after every step, as the
published code does, so AdamW's weight decay cannot move them).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

INSTANCE, CONCEPT, INTRINSIC = "instance", "concept", "intrinsic"
INTRINSIC_TEMPLATES = ("#", "%", "$", "!")  # <#i> first anchor, <%i> second, <$i> third, <!i> fourth
DEFAULT_ANCHORS = ("texture", "material", "color")
GENERIC_WORD = "object"  # the "mask only" ablation starts the concept tokens here instead of at a noun


@dataclass(frozen=True)
class TokenSpec:
    token: str  # e.g. "<&0>"
    role: str  # INSTANCE | CONCEPT | INTRINSIC
    concept_index: int
    concept_id: str
    noun: str
    attribute: str = ""  # the anchor word of an intrinsic token

    def to_json(self) -> dict:
        return asdict(self)


_ROLE_ORDER = {"instance": 0, "concept": 1, "intrinsic": 2}


def by_concept(tokens: list[dict]) -> list[dict]:
    """Token records (`TokenSpec.to_json()`) as results list them: concept by concept, instance → concept →
    intrinsic, the published row order within a role. The learner's reply and `--local` use this one order."""
    rows = sorted(enumerate(tokens), key=lambda it: (it[1]["concept_index"], _ROLE_ORDER[it[1]["role"]], it[0]))
    return [t for _, t in rows]


def plan_tokens(concepts: list[tuple[str, str]], anchors: list[str]) -> list[TokenSpec]:
    """Tokens in the published row order: every `<*i>`, every `<&i>`, then the intrinsic tokens per anchor.

    concepts: (concept_id, noun) per concept; anchors: intrinsic anchor words (0 to 4).
    """
    if len(anchors) > len(INTRINSIC_TEMPLATES):
        raise ValueError(f"at most {len(INTRINSIC_TEMPLATES)} intrinsic anchors")
    specs = [TokenSpec(f"<*{i}>", INSTANCE, i, cid, noun) for i, (cid, noun) in enumerate(concepts)]
    specs += [TokenSpec(f"<&{i}>", CONCEPT, i, cid, noun) for i, (cid, noun) in enumerate(concepts)]
    for k, anchor in enumerate(anchors):
        mark = INTRINSIC_TEMPLATES[k]
        specs += [TokenSpec(f"<{mark}{i}>", INTRINSIC, i, cid, noun, anchor) for i, (cid, noun) in enumerate(concepts)]
    return specs


class ExtendedEmbedding(nn.Module):
    """The frozen vocabulary rows followed by `new` trainable rows: ids ≥ len(base) index `new`."""

    def __init__(self, base: nn.Embedding, new: torch.Tensor):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.num_base = base.num_embeddings
        self.new = nn.Parameter(new.clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.num_base
        old = self.base(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        if not bool(is_new.any()):
            return old
        added = F.embedding(torch.where(is_new, input_ids - self.num_base, torch.zeros_like(input_ids)), self.new)
        return torch.where(is_new.unsqueeze(-1), added.to(old.dtype), old)


class ConceptTokens:
    """The job's tokens on its own tokenizer and text encoder (both copies owned by the job)."""

    def __init__(self, tokenizer, text_encoder, specs: list[TokenSpec]):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.specs = specs
        base = text_encoder.get_input_embeddings()
        if len(tokenizer) != base.num_embeddings:
            raise ValueError(f"tokenizer has {len(tokenizer)} ids but the embedding {base.num_embeddings} rows")
        added = tokenizer.add_tokens([s.token for s in specs])
        if added != len(specs):
            raise ValueError("a learned token collides with an existing token")
        self.ids = tokenizer.convert_tokens_to_ids([s.token for s in specs])
        if self.ids != list(range(base.num_embeddings, base.num_embeddings + len(specs))):
            raise ValueError("new token ids are not contiguous after the vocabulary")
        self.embedding = ExtendedEmbedding(base, torch.zeros(len(specs), base.embedding_dim, dtype=base.weight.dtype))
        text_encoder.set_input_embeddings(self.embedding)
        self.row = {s.token: r for r, s in enumerate(specs)}

    # -- rows ---------------------------------------------------------------------------------------------------

    @property
    def new(self) -> nn.Parameter:
        return self.embedding.new

    def rows(self, role: str, concept_index: int | None = None) -> list[int]:
        return [r for r, s in enumerate(self.specs)
                if s.role == role and (concept_index is None or s.concept_index == concept_index)]

    def token(self, role: str, concept_index: int, attribute: str = "") -> str:
        for s in self.specs:
            if s.role == role and s.concept_index == concept_index and (role != INTRINSIC or s.attribute == attribute):
                return s.token
        raise KeyError((role, concept_index, attribute))

    def intrinsic_tokens(self, concept_index: int) -> list[TokenSpec]:
        return [s for s in self.specs if s.role == INTRINSIC and s.concept_index == concept_index]

    def first_bpe_row(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"{word!r} has no BPE token")
        return ids[0]

    @torch.no_grad()
    def initialise(self, init_words: list[str], rng: random.Random) -> None:
        """docs/method.md#tokens: `<*i>` and `<&i>` from the first BPE token of `init_words[i]` (None = a random vocabulary
        row, the "without text init" ablation); intrinsic tokens from random vocabulary rows (re-initialised
        from `<*i>` when phase 2 starts)."""
        base = self.embedding.base.weight
        for r, s in enumerate(self.specs):
            word = init_words[s.concept_index] if s.role != INTRINSIC else None
            source = self.first_bpe_row(word) if word is not None else rng.randint(0, self.embedding.num_base - 1)
            self.new[r] = base[source]

    @torch.no_grad()
    def copy_instance_to_intrinsic(self) -> None:
        """Phase 2 starts every intrinsic token of concept i at the learned `<*i>`."""
        for s in self.specs:
            if s.role == INTRINSIC:
                self.new[self.row[s.token]] = self.new[self.row[self.token(INSTANCE, s.concept_index)]]

    def embeddings(self) -> dict[str, torch.Tensor]:
        return {s.token: self.new[r].detach().float().cpu().clone() for r, s in enumerate(self.specs)}

    # -- text ---------------------------------------------------------------------------------------------------

    def input_ids(self, texts: list[str], device) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(device)

    def encode(self, texts: list[str], device) -> torch.Tensor:
        """E(·) of each text, L2-normalised [len(texts), D] (docs/method.md#e-pooling-written-out).

        The text encoder's final-layer-normed hidden state, taken where the published code's legacy pooling
        takes it (argmax of the ids): at the highest learned token when the text has one (for a lone
        placeholder, its own position 1: the contextual output of BOS + the token), otherwise at the first
        EOS (the usual pooled sentence embedding). Explicit here so that no config `eos_token_id` changes it.
        """
        ids = self.input_ids(texts, device)
        hidden = self.text_encoder(input_ids=ids)[0]  # CLIP applies the final layer norm to this output
        has_new = (ids >= self.embedding.num_base).any(dim=1)
        at_new = ids.argmax(dim=1)
        at_eos = (ids == self.tokenizer.eos_token_id).int().argmax(dim=1)
        position = torch.where(has_new, at_new, at_eos)
        pooled = hidden[torch.arange(len(texts), device=hidden.device), position]
        return F.normalize(pooled.float(), dim=-1)

    def positions(self, ids: torch.Tensor, tokens: list[str]) -> list[int]:
        """Index of each token in one tokenised prompt `ids` [77]."""
        out = []
        for t in tokens:
            where = (ids == self.ids[self.row[t]]).nonzero()
            if len(where) == 0:
                raise ValueError(f"{t} is not in the prompt (truncated?)")
            out.append(int(where[0, 0]))
        return out
