"""Running a synthetic-data workflow over a JSON-lines input: templates, provenance, resumable
output, progress.

A workflow is a YAML file (``examples/synth/*.yaml``) naming its ``kind`` (the logic, one of
:data:`megaphi.synth.workflows.KINDS`), its prompt ``templates`` (text files next to it,
Python ``str.format`` fields such as ``{question}``), per-step ``sampling`` and its
``settings``. The runner:

1. reads every input line first (``file:line`` errors; a line needs an ``id`` or gets its line
   number), and checks that each template's fields are given by every input line or by the
   workflow, and that the endpoint serves the model: bad input fails before any request;
2. runs the items concurrently (the client caps the requests in flight), each item's requests
   through the cache;
3. writes each finished item's records to ``OUT`` in one append, then marks it done in
   ``OUT.progress.jsonl`` (:class:`~megaphi.data.jsonl.ResumableOutput`): a killed run reruns
   with no duplicates and no losses, and its finished requests come from the cache. An item
   whose request failed after its retries writes no record: it goes to ``OUT.failures.jsonl``
   with its error, is counted, and is retried by the next run.

Every record carries ``provenance``: the workflow, and per request its step, model, sampling
parameters, template name and SHA-256, raw output texts, token counts, attempts and whether it
came from the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from megaphi.synth.client import ChatClient, Reply, Sampling, SynthError

logger = logging.getLogger("megaphi.synth")


@dataclass(frozen=True)
class Template:
    """A prompt template: a text file with ``str.format`` fields."""

    name: str
    text: str

    @classmethod
    def load(cls, path: Path) -> "Template":
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SynthError(f"template {path}: {exc.strerror}") from None
        template = cls(path.stem, text)
        try:
            template.fields
        except ValueError as exc:
            raise SynthError(f"template {path}: {exc}; write literal braces as {{{{ }}}}") \
                from None
        return template

    @property
    def fields(self) -> Set[str]:
        return {f.split(".")[0].split("[")[0]
                for _, f, _, _ in string.Formatter().parse(self.text) if f}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def render(self, **values: Any) -> str:
        missing = self.fields - set(values)
        if missing:
            raise SynthError(f"template {self.name}: no value for {{{sorted(missing)[0]}}}")
        return self.text.format(**values)


@dataclass
class WorkflowSpec:
    """A workflow YAML file, loaded and checked."""

    path: Path
    name: str
    kind: str
    templates: Dict[str, Template]
    sampling: Dict[str, Sampling]
    settings: Dict[str, Any]

    @classmethod
    def load(cls, path: str) -> "WorkflowSpec":
        import yaml

        from megaphi.synth.workflows import KINDS

        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise SynthError(f"{path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SynthError(f"{path}: not YAML ({exc})") from None
        kind = raw.get("kind")
        if kind not in KINDS:
            raise SynthError(f"{path}: kind must be one of {', '.join(sorted(KINDS))}, got "
                             f"{kind!r}")
        logic = KINDS[kind]
        unknown = set(raw) - {"name", "kind", "templates", "sampling", "settings"}
        if unknown:
            raise SynthError(f"{path}: unknown key {sorted(unknown)[0]!r}")
        names = raw.get("templates") or {}
        missing = [step for step in logic.steps if step not in names]
        if missing:
            raise SynthError(f"{path}: templates.{missing[0]} is missing; {kind} needs a "
                             f"template for each of {', '.join(logic.steps)}")
        templates = {step: Template.load(p.parent / str(file)) for step, file in names.items()}
        sampling = {}
        for step in logic.steps:
            try:
                sampling[step] = Sampling(**(raw.get("sampling") or {}).get(step, {}))
            except TypeError as exc:
                raise SynthError(f"{path}: sampling.{step}: {exc}") from None
            except SynthError as exc:
                raise SynthError(f"{path}: sampling.{step}: {exc}") from None
        settings = {**logic.defaults, **(raw.get("settings") or {})}
        unknown = set(settings) - set(logic.defaults)
        if unknown:
            raise SynthError(f"{path}: settings.{sorted(unknown)[0]} is not a setting of "
                             f"{kind} ({', '.join(sorted(logic.defaults))})")
        try:
            logic.check_settings(settings)
        except SynthError as exc:
            raise SynthError(f"{path}: {exc}") from None
        return cls(p, raw.get("name") or p.stem, kind, templates, sampling, settings)


@dataclass
class ItemContext:
    """What a workflow's logic uses for one input item: its requests and their provenance."""

    spec: WorkflowSpec
    client: ChatClient
    seed: Optional[int]
    provenance: List[dict] = field(default_factory=list)
    step_clients: Dict[str, ChatClient] = field(default_factory=dict)
    """The steps sent elsewhere than ``client`` (another endpoint or model)."""

    async def ask(self, step: str, values: Dict[str, Any], n: Optional[int] = None,
                  system: Optional[str] = None) -> Reply:
        """Render ``step``'s template with ``values``, send it with ``step``'s sampling (``n``
        choices when given), record the provenance; raises :class:`ItemFailed` on failure."""
        template = self.spec.templates[step]
        sampling = self.spec.sampling[step]
        if n is not None or self.seed is not None:
            sampling = Sampling(**{**sampling.to_dict(), **({"n": n} if n else {}),
                                   **({"seed": self.seed} if self.seed is not None
                                      and sampling.seed is None else {})})
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": template.render(**values)}]
        client = self.step_clients.get(step, self.client)
        reply = await client.chat(messages, sampling)
        self.provenance.append({
            "step": step, "model": client.model, "sampling": sampling.to_dict(),
            "template": template.name, "template_sha256": template.sha256,
            "output": reply.texts, "usage": reply.usage, "attempts": reply.attempts,
            "cached": reply.cached, **({"error": reply.error} if not reply.ok else {})})
        if not reply.ok:
            raise ItemFailed(f"{step}: {reply.error}")
        return reply


class ItemFailed(Exception):
    """A request of the item failed after its retries."""


def load_inputs(path: str) -> List[dict]:
    """The input records, each with a string ``id`` (its line number when it has none)."""
    from megaphi.data.jsonl import json_lines

    out, seen = [], {}
    for where, record in json_lines(path, SynthError):
        if not isinstance(record, dict):
            raise SynthError(f"{where}: a line must be a JSON object")
        rid = str(record.get("id", where.rsplit(":", 1)[1]))
        if rid in seen:
            raise SynthError(f"{where}: id {rid!r} repeats {seen[rid]}")
        seen[rid] = where
        out.append({**record, "id": rid, "_where": where})
    return out


async def run_workflow(spec: WorkflowSpec, inputs: List[dict], client: ChatClient,
                       output: str, seed: Optional[int] = None, progress: bool = True,
                       shard: tuple = (0, 1),
                       step_clients: Optional[Dict[str, ChatClient]] = None) -> dict:
    """Run ``spec`` over ``inputs`` (those of this shard) with ``client``, or the client
    ``step_clients`` names for a step; returns the run's summary (requests of all clients)."""
    from tqdm import tqdm

    from megaphi.data.jsonl import ResumableOutput
    from megaphi.synth.workflows import KINDS

    logic = KINDS[spec.kind](spec.settings)
    for record in inputs:  # every template field is given, before any request
        logic.check_input(record, spec)
    if logic.needs_sandbox:  # bubblewrap works here, before any request
        from megaphi.sandbox import SandboxUnavailable, run_python

        try:
            run_python("pass")
        except SandboxUnavailable as exc:
            raise SynthError(str(exc)) from None
    step_clients = step_clients or {}
    used = [client] if set(logic.steps) - set(step_clients) else []
    used += [c for c in step_clients.values() if all(c is not u for u in used)]
    if logic.steps:
        for c in used:  # every endpoint answers and serves its model, before any request
            await c.check()
    index, count = shard
    mine = [r for i, r in enumerate(inputs) if i % count == index]
    out = ResumableOutput(output, "input_id")
    todo = [r for r in mine if r["id"] not in out.done]
    failures_path = Path(str(output) + ".failures.jsonl")
    counts = {"items": len(mine), "done_before": len(mine) - len(todo), "records": 0,
              "kept": 0, "dropped": 0, "failed": 0}
    start = time.perf_counter()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=spec.name, unit="item",
               disable=not progress, dynamic_ncols=True)

    async def one(record: dict) -> None:
        ctx = ItemContext(spec, client, seed, step_clients=step_clients)
        try:
            produced = await logic.run(ctx, {k: v for k, v in record.items() if k != "_where"})
        except ItemFailed as exc:
            counts["failed"] += 1
            with open(failures_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"input_id": record["id"], "workflow": spec.name,
                                    "error": str(exc), "provenance": ctx.provenance},
                                   ensure_ascii=False) + "\n")
        else:
            lines = []
            for k, rec in enumerate(produced):
                lines.append({**rec, "input_id": record["id"],
                              "id": rec.get("id", f"{record['id']}/{k}" if len(produced) > 1
                                            else record["id"]),
                              "provenance": {"workflow": spec.name, "kind": spec.kind,
                                             "requests": ctx.provenance}})
            counts["records"] += len(lines)
            counts["kept" if lines else "dropped"] += 1
            out.write(record["id"], lines, {"records": len(lines)})
        bar.update(1)
        elapsed = time.perf_counter() - start
        requests = sum(c.stats.requests for c in used)
        bar.set_postfix_str(f"{requests / elapsed:.1f} req/s, "
                            f"{counts['failed']} failed", refresh=False)

    window = 4 * client.concurrency  # items in progress at once
    pending: Set[asyncio.Task] = set()
    try:
        for record in todo:
            pending.add(asyncio.ensure_future(one(record)))
            if len(pending) >= window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        if pending:
            for task in (await asyncio.wait(pending))[0]:
                task.result()
    finally:
        bar.close()
    stats = [c.stats for c in used] or [client.stats]
    total = {key: sum(getattr(st, key) for st in stats)
             for key in ("requests", "retries", "cache_hits", "prompt_tokens",
                         "completion_tokens")}
    return {**counts, **total, "max_in_flight": max(st.max_in_flight for st in stats),
            "seconds": round(time.perf_counter() - start, 3)}


__all__ = ["ItemContext", "ItemFailed", "Template", "WorkflowSpec", "load_inputs",
           "run_workflow"]
