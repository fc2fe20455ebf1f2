"""Stage 3 with reshard_after_forward=True: each flat bucket is all-gathered just before the first
module that uses it runs (forward and backward), the next bucket is prefetched meanwhile, and
the bucket is freed as soon as nothing needs it. Used by torchlane.ShardedDataParallel.

Note [Per-bucket gathering in stage 3]
The unit of gathering is the flat bucket of Note [Sharded flat bucket] (one all_gather_single
each), and a module needs the buckets that hold its direct parameters.
- Forward: a forward pre-hook gathers the module's buckets (waiting on a prefetch if one is in
  flight) and counts the module as active on them; the post-hook uncounts it. The first forward
  records the sequence of module calls (their buckets) and frees every bucket no active module
  needs (an enclosing module whose direct parameters share the bucket keeps it alive). Later
  forwards keep a bucket until its last call in the sequence (the submodules of one block share
  one gather), and each pre-hook launches the async gathers of the next call's buckets before
  the module computes, so communication overlaps compute.
- Backward: the post-hook registers a hook on the module's outputs; it fires when their gradient
  is ready, before the module's own backward runs, and gathers the module's buckets again (the
  autograd graph saved views of the parameters, whose storage is resized back and refilled in
  place) and prefetches the buckets of the call before it (backward runs the calls in reverse). A bucket is freed once every one
  of its parameters has accumulated its gradient in this backward (a post-accumulate-grad hook),
  which is when no backward node needs the values any longer; buckets with an unused parameter
  stay until the optimizer step frees everything.
- Every rank must run the same modules in the same order (as for torch FSDP): the gathers are
  collectives issued from the hooks. Parameters must be used inside their own module's forward.
"""

import functools

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class BucketGatherer:
    def __init__(self, model):
        self.model = model
        n = len(model._flats)
        self.full = [False] * n
        self.pending = {}  # bucket -> (Work, shard cast to the flat's dtype)
        self.active = [0] * n
        # The first forward records the module calls (their buckets) in order; later ones use it
        # to prefetch the next call's buckets and to keep a bucket until its last call.
        self.calls, self.recorded, self.call_index = [], False, 0
        self.last_use = {}
        self.pinned = False  # summon_full_params: the hooks gather but never free
        self.gathers = 0  # all-gathers launched (a measure of re-gathering)
        self.prefetch_hits = 0  # buckets found already in flight when a module needed them
        self.peak_bytes = 0  # most full-parameter bytes held at once
        index = {id(p): i for i, p in enumerate(model._params)}
        bucket_of = {i: b for b, bucket in enumerate(model._buckets) for i in bucket}
        self.sizes = [len(bucket) for bucket in model._buckets]
        self.waiting = list(self.sizes)
        self.handles = []
        for m in model.module.modules():
            own = [p for p in m._parameters.values() if p is not None and id(p) in index]
            buckets = sorted({bucket_of[index[id(p)]] for p in own})
            if buckets:
                self.handles.append(
                    m.register_forward_pre_hook(functools.partial(self._pre_forward, buckets))
                )
                self.handles.append(
                    m.register_forward_hook(functools.partial(self._post_forward, buckets))
                )
        for i, p in enumerate(model._params):
            hook = functools.partial(self._grad_ready, bucket_of[i])
            self.handles.append(p.register_post_accumulate_grad_hook(hook))

    # ---- one bucket ----
    def _launch(self, b):
        flat = self.model._flats[b]
        flat.untyped_storage().resize_(flat.numel() * flat.element_size())
        with torch.no_grad():
            shard = self.model._shards[b].detach().to(flat.dtype)
            work = _all_gather(flat, shard, group=self.model.process_group, async_op=True)
        self.pending[b] = (work, shard)
        self.gathers += 1
        held = sum(f.untyped_storage().nbytes() for f in self.model._flats)
        self.peak_bytes = max(self.peak_bytes, held)

    def _ensure(self, b):
        if self.full[b]:
            return
        if b not in self.pending:
            self._launch(b)
        else:
            self.prefetch_hits += 1
        work, _ = self.pending.pop(b)
        work.wait()
        self.full[b] = True

    def _release(self, b):
        if not self.pinned:
            self._free(b)

    def _free(self, b):
        if b in self.pending:
            self.pending.pop(b)[0].wait()
        self.model._flats[b].untyped_storage().resize_(0)
        self.full[b] = False
        self.model._gathered = False

    def _prefetch(self, call):
        """Launches the gathers of recorded call `call`'s buckets that are not held."""
        if self.recorded and 0 <= call < len(self.calls):
            for b in self.calls[call]:
                if not self.full[b] and b not in self.pending:
                    self._launch(b)

    # ---- hooks ----
    def _pre_forward(self, buckets, module, args):
        call = self.call_index
        self.call_index += 1
        if not self.recorded:
            self.calls.append(buckets)
        module._torchlane_call = call  # read by the post-hook of this call
        for b in buckets:
            self.active[b] += 1
        for b in buckets:
            self._ensure(b)
        self._prefetch(call + 1)

    def _post_forward(self, buckets, module, args, output):
        call = module.__dict__.pop("_torchlane_call", self.call_index)
        for b in buckets:
            self.active[b] -= 1
        if torch.is_grad_enabled():
            hook = functools.partial(self._pre_backward, buckets, call)
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(hook)
        for b in buckets:
            # Before the order is known every bucket goes at once; then after its last call.
            if self.active[b] == 0 and (not self.recorded or self.last_use.get(b, -1) <= call):
                self._release(b)

    def _pre_backward(self, buckets, call, grad):
        for b in buckets:
            self._ensure(b)
        self._prefetch(call - 1)  # backward runs the calls in reverse

    def _grad_ready(self, b, param):
        self.waiting[b] -= 1
        if self.waiting[b] == 0 and self.active[b] == 0:
            self._release(b)

    # ---- the whole model ----
    def begin_forward(self):
        self.waiting = list(self.sizes)
        self.call_index = 0

    def end_forward(self):
        if not self.recorded:
            self.recorded = True
            for call, buckets in enumerate(self.calls):
                for b in buckets:
                    self.last_use[b] = call

    def gather_all(self):
        for b in range(len(self.full)):
            if not self.full[b] and b not in self.pending:
                self._launch(b)
        for b in range(len(self.full)):
            self._ensure(b)

    def free_all(self):
        for b in range(len(self.full)):
            self._free(b)
        self.active = [0] * len(self.full)


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)
