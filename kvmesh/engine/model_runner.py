"""ModelRunner: turns a ScheduledBatch into the model's flat input tensors and runs it."""

from __future__ import annotations

import numpy as np
import torch

from kvmesh.engine.scheduler import ScheduledBatch
from kvmesh.engine.sequence import Sequence
from kvmesh.gpu.attention import AttentionMetadata, PrefillSpan
from kvmesh.gpu.lora import LoraBatch, LoraStack
from kvmesh.gpu.model import CausalLM


class ModelRunner:
    def __init__(
        self, model: CausalLM, kv_caches: list[torch.Tensor], block_size: int, device: str
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = torch.device(device)
        # Float32 pools on CPU decode with the Numba kernel; everything else with torch.
        self.cpu_decode_kernel = self.device.type == "cpu" and kv_caches[0].dtype == torch.float32
        self.lora_stack: LoraStack | None = None  # the last step's adapters, concatenated

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Compute the batch's tokens; return logits for the sequences whose every token
        is now computed (they sample next), with those sequences in row order."""
        input_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        decodes: list[Sequence] = []
        prefills: list[tuple[Sequence, int, int]] = []
        for seq, num_new in batch.items:
            start = seq.num_computed_tokens
            if num_new == 1:
                decodes.append(seq)
            else:
                prefills.append((seq, len(input_ids), num_new))
            input_ids += seq.token_ids[start : start + num_new]
            positions += range(start, start + num_new)
            if start + num_new == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_seqs.append(seq)
        meta = self._metadata(batch, decodes, prefills, positions)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        lora = LoraBatch.of(
            [s.lora for s, _ in batch.items],
            [n for _, n in batch.items],
            ids.device,
            self.lora_stack,
        )
        self.lora_stack = None if lora is None else lora.stack
        hidden = self.model(ids, pos, self.kv_caches, meta, lora)
        if not sample_rows:
            return None, []
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows)), sample_seqs

    def _metadata(self, batch, decodes, prefills, positions) -> AttentionMetadata:
        bs = self.block_size
        slot_list = []
        for seq, num_new in batch.items:
            table = seq.block_table
            start = seq.num_computed_tokens
            slot_list += [table[p // bs] * bs + p % bs for p in range(start, start + num_new)]
        slot_mapping = torch.tensor(slot_list, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(slot_mapping, len(decodes), [])
        if decodes and self.cpu_decode_kernel:
            meta.decode_tables = self._block_tables(decodes)
            meta.decode_ctx_lens = np.array([s.num_computed_tokens + 1 for s in decodes], np.int64)
        elif decodes:
            ctx_lens = torch.tensor(
                [s.num_computed_tokens + 1 for s in decodes], device=self.device
            )
            tables = torch.from_numpy(self._block_tables(decodes)).to(self.device)
            meta.decode_slots, meta.decode_mask = self._padded_slots(tables, ctx_lens)
        for seq, q_start, num_new in prefills:
            ctx_len = seq.num_computed_tokens + num_new
            ctx_slots = None
            if seq.num_computed_tokens:
                table = torch.tensor(seq.block_table, dtype=torch.long, device=self.device)
                ctx_slots = self._slots(table.unsqueeze(0), ctx_len)[0]
            meta.prefills.append(PrefillSpan(q_start, num_new, ctx_len, ctx_slots))
        return meta

    def _slots(self, tables: torch.Tensor, length: int) -> torch.Tensor:
        """Pool slots of positions 0..length-1 for each row of block tables [B, max_blocks]."""
        pos = torch.arange(length, device=self.device)
        return tables[:, pos // self.block_size] * self.block_size + pos % self.block_size

    @staticmethod
    def _block_tables(seqs: list[Sequence]) -> np.ndarray:
        """Block tables padded with block 0 into one [B, max_blocks] array."""
        tables = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), np.int64)
        for row, seq in enumerate(seqs):
            tables[row, : len(seq.block_table)] = seq.block_table
        return tables

    def _padded_slots(self, tables: torch.Tensor, ctx_lens: torch.Tensor):
        max_ctx = int(ctx_lens.max())
        slots = self._slots(tables, max_ctx)
        mask = torch.arange(max_ctx, device=self.device).unsqueeze(0) < ctx_lens.unsqueeze(1)
        return slots, mask[:, None, None, :]
