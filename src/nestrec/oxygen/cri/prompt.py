"""What the slow-thinking LLM sees and what it must answer: context, prompt, output schema.

Context (design brief §5): time of the window, the user's profile and their recent behaviour,
all strictly *before* the window starts — never the item being predicted. MovieLens has no
location/weather/festival, so time is weekday + hour (UTC) and behaviour is the last rated movies.

The answer is a JSON object (schema below, validated with ``jsonschema``): an intent sentence,
the evidence it rests on, the genres the user is likely to want next and how time-sensitive the
need is. Its text form (:func:`instruction_text`) is what the text encoder turns into ``I_r``.

The context also travels inside the prompt as one JSON block, so the **rule-based reasoner**
(:class:`RuleBasedReasoner`, deterministic, the fallback and what unit tests use) answers the very
same prompts through the same interface and validation as an LLM.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import jsonschema

__all__ = [
    "INSTRUCTION_SCHEMA",
    "PROMPT_VERSION",
    "InvalidInstruction",
    "JSON_PREFIX",
    "JSON_STOP",
    "JSON_SUFFIX",
    "RuleBasedReasoner",
    "UserContext",
    "build_prompt",
    "instruction_text",
    "parse_instruction",
]

#: bump when the prompt or schema changes: cached rows of another version are regenerated
PROMPT_VERSION = "cri-v2"

INSTRUCTION_SCHEMA: dict = {
    "type": "object",
    "required": ["intent"],
    "properties": {
        "intent": {"type": "string", "minLength": 3, "maxLength": 400},
        "evidence": {"type": "string", "maxLength": 600},
        "categories": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 60},
            "minItems": 1,
            "maxItems": 6,
        },
        "time_sensitivity": {"enum": ["low", "medium", "high"]},
    },
}

_SYSTEM = (
    "You are a movie recommendation analyst. Read the user's recent movies and say, in one sentence, "
    "what kind of movie they want to watch next and why. Reply as JSON: "
    '{"intent": "...", "categories": ["genre", ...], "time_sensitivity": "low|medium|high"}.'
)

#: What an LLM backend prefills the answer with and where it stops (``response_prefix`` /
#: ``stop`` / ``response_suffix``): schema-guided decoding for models too small to hold a JSON
#: format on their own (SmolLM2-135M loops inside arrays) — the model writes the intent sentence,
#: the skeleton around it is fixed, as guided-JSON decoding in vLLM/SGLang would do.
JSON_PREFIX = '{"intent": "In the mood for'
JSON_STOP = '"'
JSON_SUFFIX = '"}'


class InvalidInstruction(ValueError):
    """The reasoner's output is not a JSON object that satisfies :data:`INSTRUCTION_SCHEMA`."""


@dataclass
class UserContext:
    """Everything the reasoner may use for one (user, window); built from pre-window data only."""

    user: int
    window: int
    as_of: float
    profile: dict[str, str] = field(default_factory=dict)
    recent: list[dict] = field(default_factory=list)  # newest last: title, genres, year, rating
    genres: list[str] = field(default_factory=list)  # the catalogue's genre vocabulary

    def when(self) -> str:
        moment = datetime.fromtimestamp(self.as_of, tz=timezone.utc)
        return f"{moment:%A} {moment:%H}:00 UTC, {moment:%B %Y}"


def build_prompt(ctx: UserContext) -> tuple[str, str]:
    """(system, user) messages for one context."""
    facts = {
        "time": ctx.when(),
        "profile": ctx.profile,
        "recent_movies": [
            {"title": r["title"], "genres": r["genres"], "rating": r.get("rating")} for r in ctx.recent
        ],
    }
    user = (
        "Context (JSON):\n" + json.dumps(facts, ensure_ascii=False) + "\n"
        "What does this user want to watch next? Reply with the JSON object only."
    )
    return _SYSTEM, user


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_instruction(text: str) -> dict:
    """The first JSON object in ``text`` (code fences and chatter around it are tolerated), validated."""
    match = _JSON_OBJECT.search(text or "")
    if not match:
        raise InvalidInstruction("no JSON object in the reasoner output")
    candidate = match.group(0)
    for end in range(len(candidate), 0, -1):  # trailing chatter after the object: shrink to a parse
        if candidate[end - 1] != "}":
            continue
        try:
            value = json.loads(candidate[:end])
            break
        except json.JSONDecodeError:
            continue
    else:
        raise InvalidInstruction("reasoner output is not valid JSON")
    try:
        jsonschema.validate(value, INSTRUCTION_SCHEMA)
    except jsonschema.ValidationError as err:
        raise InvalidInstruction(f"reasoner output violates the schema: {err.message}") from None
    return value


def instruction_text(instruction: dict) -> str:
    """The sentence the text encoder embeds: intent + wanted genres (+ urgency)."""
    parts = [instruction["intent"].strip()]
    if instruction.get("categories"):
        parts.append("wants: " + ", ".join(instruction["categories"]))
    if instruction.get("time_sensitivity"):
        parts.append(f"urgency: {instruction['time_sensitivity']}")
    return " | ".join(parts)


class RuleBasedReasoner:
    """Deterministic reasoner over the prompt's context block; NOT a language model.

    It weighs the genres of the recent movies by recency and rating and names the top ones, with
    the time of day as a light modifier (late evenings favour longer dramas/thrillers in its rules).
    It exists so that tests and machines without the LLM exercise the whole pipeline.
    """

    name = "rules:recency-rating-genres-v1"

    def generate(self, prompts: list[tuple[str, str]]) -> list[str]:
        return [json.dumps(self.reason(_context_of(user))) for _, user in prompts]

    @staticmethod
    def reason(facts: dict) -> dict:
        recent = facts.get("recent_movies", [])
        scores: Counter[str] = Counter()
        for age, movie in enumerate(reversed(recent)):
            rating = movie.get("rating") or 3.0
            for genre in filter(None, str(movie.get("genres", "")).split("|")):
                scores[genre] += (0.85**age) * (float(rating) - 2.0)
        ranked = [g for g, s in scores.most_common() if s > 0][:3] or ["Drama"]
        hour = int(re.search(r" (\d\d):00", facts.get("time", " 12:00")).group(1))
        late = hour >= 21 or hour < 4
        intent = f"Looking for more {ranked[0].lower()} films" + (
            f", possibly {ranked[1].lower()}" if len(ranked) > 1 else ""
        )
        evidence = f"{len(recent)} recent ratings; strongest recent genres {', '.join(ranked)}"
        return {
            "intent": intent + (" for a late-night watch" if late else ""),
            "evidence": evidence,
            "categories": ranked,
            "time_sensitivity": "high" if len(recent) >= 5 and late else "medium" if recent else "low",
        }


def _context_of(user_prompt: str) -> dict:
    start = user_prompt.index("{")
    end = user_prompt.index("\n", start)
    return json.loads(user_prompt[start:end])


def context_dict(ctx: UserContext) -> dict:
    """Plain-dict form (for logging and tests)."""
    return asdict(ctx)
