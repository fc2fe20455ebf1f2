"""Byte-level text corpus that exists offline on every machine.

The default corpus is the Python standard library's own source, read from the running
interpreter (sorted file names, so every rank and every run sees the same bytes). `--data PATH`
takes any text file, or a folder whose text files (by suffix) are concatenated in sorted order.
Tokens are raw bytes (vocabulary 256), so no tokenizer or download is ever needed.
"""

import os
import sysconfig
from pathlib import Path

import torch

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".c", ".h", ".cpp", ".hpp", ".js", ".html")


def stdlib_dir():
    return Path(sysconfig.get_paths()["stdlib"])


def _text_files(folder):
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(
            d for d in dirs if d not in ("__pycache__", "site-packages", "test", "tests")
        )
        files.extend(Path(root) / n for n in sorted(names) if n.endswith(TEXT_SUFFIXES))
    return sorted(files)


def load_bytes(path=None, max_bytes=None):
    """Return (bytes, description). path None: the stdlib source; a file; or a folder."""
    if path is None:
        folder = stdlib_dir()
        # Top-level modules only: a few MB of ordinary, well-formatted Python.
        files = sorted(p for p in folder.glob("*.py"))
        source = (
            f"Python {'.'.join(map(str, __import__('sys').version_info[:2]))} stdlib ({folder})"
        )
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"--data: {path!r} does not exist")
        if p.is_dir():
            files = _text_files(p)
            if not files:
                raise ValueError(
                    f"--data: folder {path!r} holds no text files ({', '.join(TEXT_SUFFIXES)})"
                )
        else:
            files = [p]
        source = str(p)
    chunks, total = [], 0
    for f in files:
        try:
            b = f.read_bytes()
        except OSError:
            continue
        if max_bytes is not None and total + len(b) > max_bytes:
            b = b[: max_bytes - total]
        chunks.append(b)
        total += len(b)
        if max_bytes is not None and total >= max_bytes:
            break
    data = b"".join(chunks)
    if len(data) < 1024:
        raise ValueError(
            f"--data: corpus {source!r} has only {len(data)} bytes; need at least 1024"
        )
    return data, f"{source}: {len(files)} file(s), {len(data) / 1e6:.2f} MB"


def split(data, val_fraction=0.1):
    """Train/validation split by position (the last val_fraction is validation)."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n_val = max(1, int(len(t) * val_fraction))
    return t[:-n_val], t[-n_val:]


class ShardedBatches:
    """Disjoint shard per rank of non-overlapping (block_size + 1)-token windows, reshuffled per
    epoch with a seed shared by all ranks (what torch's DistributedSampler does, drop_last=True).

    position = (epoch, index of the next batch within the epoch) is all the state there is, so a
    checkpoint can resume the exact data order.
    """

    def __init__(self, tokens, block_size, batch_size, rank, world_size, seed=0):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        n_windows = (len(tokens) - 1) // block_size
        self.per_rank = n_windows // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"corpus too small: {len(tokens)} tokens give {self.per_rank} windows of "
                f"{block_size + 1} tokens per rank, fewer than batch_size={batch_size}"
            )
        self.epoch, self.index = 0, 0
        self._order = None

    def _epoch_order(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.per_rank * self.world_size, generator=g)
        return perm[self.rank :: self.world_size]  # disjoint across ranks

    def state(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state):
        self.epoch, self.index, self._order = state["epoch"], state["index"], None

    def next(self):
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._epoch_order()
        ids = self._order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        starts = ids * self.block_size
        offsets = torch.arange(self.block_size + 1)
        windows = self.tokens[starts[:, None] + offsets[None, :]]
        return windows[:, :-1], windows[:, 1:]


def random_batch(tokens, block_size, batch_size, generator):
    """Random windows (for validation: same generator seed on every call gives the same batch)."""
    starts = torch.randint(0, len(tokens) - block_size - 1, (batch_size,), generator=generator)
    offsets = torch.arange(block_size + 1)
    windows = tokens[starts[:, None] + offsets[None, :]]
    return windows[:, :-1], windows[:, 1:]


def documents(tokens, max_len, min_len=2):
    """Split a token tensor into documents at blank lines (two newlines), as (start, length)
    pairs of at most max_len tokens (longer documents are cut into max_len pieces; pieces shorter
    than min_len are dropped). Lengths are skewed: one-line paragraphs next to long functions."""
    nl = (tokens[:-1] == 10) & (tokens[1:] == 10)
    cuts = (nl.nonzero().flatten() + 2).tolist()
    out, start = [], 0
    for end in [*cuts, len(tokens)]:
        for s in range(start, end, max_len):
            n = min(max_len, end - s)
            if n >= min_len:
                out.append((s, n))
        start = end
    return out


class DocumentBatches:
    """Variable-length documents, split per global step by torchlane.data.TokenBalancedSampler
    (`--sampler tokens`): each rank gets about the same number of tokens, padded only to its own
    longest document. next() returns (x, y, local_tokens); y is -100 on padding.

    With pack_len, each rank's documents come packed into rows of pack_len tokens, and next()
    also returns the per-row cu_seqlens (attention stays within each document: see
    torchlane.varlen_attention) and per-token positions restarting at every document.
    """

    def __init__(self, tokens, block_size, batch_size, rank, world_size, seed=0, pack=False):
        from torchlane.data import TokenBalancedSampler

        self.tokens, self.pack = tokens, pack
        self.docs = documents(tokens, block_size + 1)
        # A document of n tokens gives n - 1 (input, target) pairs.
        lengths = [n - 1 for _, n in self.docs]
        self.sampler = TokenBalancedSampler(
            lengths,
            batch_size * world_size,
            world_size,
            rank,
            seed=seed,
            drop_last=True,
            pack_len=block_size if pack else None,
        )
        self.batches_per_epoch = len(self.sampler)
        if self.batches_per_epoch < 1:
            raise ValueError(f"corpus too small: {len(self.docs)} documents < one global batch")
        self.epoch, self.index, self._steps = 0, 0, None

    def state(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state):
        self.epoch, self.index, self._steps = state["epoch"], state["index"], None

    def next(self):
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._steps = self.epoch + 1, 0, None
        if self._steps is None:
            self.sampler.set_epoch(self.epoch)
            self._steps = self.sampler.global_steps()
        part = self.sampler.plan_step(self._steps[self.index])[self.sampler.rank]
        self.index += 1
        if self.pack:
            return self._packed(part)
        width = max((self.docs[i][1] - 1 for i in part), default=1)
        x = torch.zeros(max(len(part), 1), width, dtype=torch.long)
        y = torch.full_like(x, -100)
        for row, i in enumerate(part):
            s, n = self.docs[i]
            x[row, : n - 1] = self.tokens[s : s + n - 1]
            y[row, : n - 1] = self.tokens[s + 1 : s + n]
        return x, y, int((y != -100).sum())

    def _packed(self, rows):
        width = self.sampler.pack_len
        x = torch.zeros(max(len(rows), 1), width, dtype=torch.long)
        y = torch.full_like(x, -100)
        pos = torch.zeros_like(x)
        cu = []
        for r, row in enumerate(rows):
            at, offs = 0, [0]
            for i, start, n in row:
                s = self.docs[i][0] + start
                x[r, at : at + n] = self.tokens[s : s + n]
                y[r, at : at + n] = self.tokens[s + 1 : s + n + 1]
                pos[r, at : at + n] = torch.arange(n)
                at += n
                offs.append(at)
            if at < width:
                offs.append(width)  # the padding tail is its own (ignored) segment
            cu.append(torch.tensor(offs))
        return x, y, int((y != -100).sum()), cu, pos
