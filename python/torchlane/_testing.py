"""Test-only entry points of torchlane's C++ core: pure plans, kernel switches, counters.

Not part of the public API; tests and benchmarks use them to reach inside (the bucket plans of
the compression hooks, the CPU attention kernel's switches, the kept-Work counters).
"""

from torchlane._C import _testing as _t

kept_work_stats = _t.kept_work_stats
topk_count = _t.topk_count
topk_ratio_at = _t.topk_ratio_at
topk_plan = _t.topk_plan
powersgd_seeds = _t.powersgd_seeds
powersgd_plan = _t.powersgd_plan
attention_cpu_microkernels = _t.attention_cpu_microkernels
attention_cpu_amx = _t.attention_cpu_amx
attention_cpu_microkernels_compiled = _t.attention_cpu_microkernels_compiled
