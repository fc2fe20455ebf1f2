#pragma once
// Keeps the c10d Work of every collective torchlane launches until it can be destroyed on a
// thread of torchlane's choosing. See Note [Releasing collectives' Work objects].
#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <cstddef>
#include <vector>

namespace torchlane::comm {

// Note [Releasing collectives' Work objects]
// ProcessGroupGloo runs a collective on its worker thread and drops its reference to the Work
// right after; when that is the last reference, the Work is destroyed on the worker thread, and
// the at::ThreadLocalState it captured at launch releases a Python object, which takes the GIL.
// Once the interpreter is finalizing, CPython ends a thread that asks for the GIL with
// pthread_exit, and that forced unwind through the worker loop's frames calls std::terminate
// ("terminate called without an active exception"). A script whose last all-reduce completes
// just before it exits hits this when the worker is descheduled for a few milliseconds: a
// restarted attempt of tests/test_restart.py aborted so in 5 of 44 runs on 2 busy cores, with
// the backtrace runLoop -> ~AsyncAllreduceWork -> ~ThreadLocalState -> SafePyObject decref ->
// PyEval_AcquireThread -> pthread_exit -> terminate. (The usual c10d pattern,
// `pg->allreduce(t)->getFuture()`, keeps only the future and leaves the last reference to Gloo.)
// So every collective the reducer and the C++ hooks launch goes through launched(): the Work is
// kept in a process-wide list; works that only the list still references (the collective is done
// and Gloo let go of it) are dropped at later launches and at the end of each backward pass
// (drop_finished), by that thread; the rest are
// released at interpreter exit by an atexit hook (torchlane/__init__.py ->
// _C._release_kept_works), which waits, GIL released, until Gloo's worker has let go of each one
// (at most timeout_s in all) and then drops them on the exiting thread, before finalization.

// Keeps `work` and returns its future.
c10::intrusive_ptr<c10::ivalue::Future> launched(c10::intrusive_ptr<c10d::Work> work);

// Keeps `work` (for Works without a future, e.g. Gloo's reduce_scatter_single: wait on the Work).
void keep(c10::intrusive_ptr<c10d::Work> work);

// Drops the kept works that only the list still references, on the calling thread. The reducer
// calls it at the end of a backward pass, so that a hook's wire tensors (held by its Work) are
// not kept until the next launch.
void drop_finished();

// The kept works (the list is left empty).
std::vector<c10::intrusive_ptr<c10d::Work>> take_kept_works();

// Waits until each of `works` is referenced only by `works`, for at most timeout_s seconds in all;
// returns how many still had other references at the end (the caller then drops `works`).
size_t wait_sole_owner(const std::vector<c10::intrusive_ptr<c10d::Work>>& works, double timeout_s);

// Counters since the process started (tests): works launched; works whose last reference was
// dropped by torchlane (in launched(), drop_finished() or _release_kept_works: the destructor ran
// on that thread, not on the process group's); works kept now.
struct KeptWorkStats {
  size_t launched = 0, destroyed_here = 0, kept = 0;
};
KeptWorkStats kept_work_stats();

}  // namespace torchlane::comm
