"""The generate controller loop: the teacher writes responses (sequence-level KD data synthesis).

Reads the conversations of ``data.train``, drops a trailing assistant turn if there is one (its
response is regenerated), renders each prompt with the teacher's chat template, samples
``rollout.n_samples_per_prompt`` responses and writes one JSON line per response: the row's other
fields, ``messages`` ending with the new assistant turn, and ``finish_reason``. Prompts too long
for ``data.max_len``, empty responses and (with ``generate.drop_truncated``) responses cut by
``rollout.max_new_tokens`` are left out and counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from kdlib.config.schema import KDConfig
from kdlib.controller.mode import Needs, RunMode, TeacherNeed
from kdlib.data.encoding import ChatEncoder
from kdlib.data.samples import load_conversations
from kdlib.data.sources import load_rows
from kdlib.models.loading import load_tokenizer
from kdlib.progress import progress
from kdlib.result import RunResult
from kdlib.tracking import write_json

if TYPE_CHECKING:
    from kdlib.pipeline import Pipeline

log = logging.getLogger(__name__)


class GenerateMode(RunMode):
    @classmethod
    def needs(cls, cfg: KDConfig) -> Needs:
        return Needs(responses=False, prompts=False, teacher=TeacherNeed.none, students=False, rollout="teacher")

    def __init__(self, pipeline: "Pipeline") -> None:
        super().__init__(pipeline)
        self.run_dir = pipeline.run_dir
        self.engines = pipeline.rollout

    def run(self) -> RunResult:
        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.teacher)  # the generating model's tokenizer
        encoder = ChatEncoder(tokenizer, apply_chat_template=cfg.data.apply_chat_template, name="teacher")
        source = load_rows(cfg.data.train, split=cfg.data.train_split, key="data.train", max_rows=cfg.data.max_samples)
        counts: Counter = Counter(rows=len(source.rows))
        jobs = []
        for row in load_conversations(source, cfg.data):
            index, conversation = row.index, row.conversation
            prompt = conversation[:-1] if conversation[-1]["role"] == "assistant" else conversation
            ids = encoder.encode_prompt(prompt)
            if len(ids) >= cfg.data.max_len:
                counts[f"dropped (prompt longer than data.max_len={cfg.data.max_len})"] += 1
                continue
            jobs.append((index, prompt, ids))

        d = cfg.data
        replaced = {d.messages_key, d.prompt_key, d.response_key, "conversations", "instruction", "input", "output", "system"}
        output = (Path(cfg.generate.output) if cfg.generate.output else self.run_dir / "generated.jsonl").resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        batch = max(cfg.rollout.batch_size, 1)
        with output.open("w", encoding="utf-8") as handle, progress(
            "generating", total=len(jobs), unit="prompt", enabled=cfg.logging.progress
        ) as bar:
            for start in range(0, len(jobs), batch):
                chunk = jobs[start : start + batch]
                generations = self.engines.generate(
                    [[ids for _, _, ids in chunk]], encoder.end_of_turn_ids, encoder.pad_id, [cfg.seed + start],
                )[0]
                for (index, prompt, _), samples in zip(chunk, generations):
                    for sample in samples:
                        text = tokenizer.decode(sample.token_ids, skip_special_tokens=True).strip()
                        if sample.finish_reason == "length":
                            counts["truncated by rollout.max_new_tokens"] += 1
                            if cfg.generate.drop_truncated:
                                continue
                        if not text:
                            counts["dropped (empty response)"] += 1
                            continue
                        row = {k: v for k, v in source.rows[index].items() if k not in replaced}
                        row["messages"] = prompt + [{"role": "assistant", "content": text}]
                        row["finish_reason"] = sample.finish_reason
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                        counts["written"] += 1
                bar.update(len(chunk))
        summary = dict(counts)
        write_json(self.run_dir / "generate_report.json", {"output": str(output), **summary})
        log.info("generated %d responses into %s (%s)", counts["written"], output, summary)
        return RunResult(run_dir=self.run_dir, metrics={k: float(v) for k, v in summary.items()}, outputs={"generated": output})

