"""The demo zoo's routing file: which expert answers which domain, by keywords.

The zoo keeps this small keyword format in `rules.json` beside its experts; the served demo
turns it into the router's rule table (`zoo.served.routing_table`, same order and keywords),
and `ccoe demo reproduce` routes its in-process mixed batches with `RuleTable.route`:

    {"format_version": 1,
     "rules": [{"id": "r-sql", "domain": "sql", "keywords": ["employees", "salary"], "expert": "sql"}],
     "fallback": null}

A request matches a rule when its text contains any keyword (case-insensitive); the first
matching rule wins; `fallback` (an expert name or null for the bare backbone) takes the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ccoe_common.zoo.domains import Domain


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Stable rule id, e.g. 'r-sql'.")
    domain: str = Field(description="The domain this rule routes, e.g. 'sql'.")
    keywords: list[str] = Field(min_length=1, description="Any of these (case-insensitive) in the request matches.")
    expert: str = Field(description="Target expert name (newest resident version), e.g. 'sql'.")


class RuleTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(1, description="Rule file format revision.")
    rules: list[Rule] = Field(description="Checked in order; the first match wins.")
    fallback: str | None = Field(None, description="Expert for requests no rule matches; null = backbone.")

    def route(self, text: str) -> tuple[str | None, str | None]:
        """(expert, rule id) for a request; (fallback, None) when no rule matches."""
        low = text.lower()
        for rule in self.rules:
            if any(k.lower() in low for k in rule.keywords):
                return rule.expert, rule.id
        return self.fallback, None


def write_rules(path: Path, domains: dict[str, Domain]) -> Path:
    # SQL first: its requests also contain words like "how many" that the arithmetic rule uses.
    order = sorted(domains, key=lambda n: (n != "sql", n))
    table = RuleTable(rules=[Rule(id=f"r-{n}", domain=n, keywords=list(domains[n].keywords), expert=n) for n in order])
    path.write_text(json.dumps(table.model_dump(mode="json"), indent=2) + "\n")
    return path


def read_rules(path: Path) -> RuleTable:
    return RuleTable.model_validate_json(path.read_text())
