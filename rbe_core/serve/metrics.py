"""Server metrics in the Prometheus text format (``GET /metrics``), thread-safe.

Counters: requests by endpoint and status, prompt and generated tokens, cancelled generations;
gauges: queue depth and active sequences per model, generated tokens/s over the last 10 s;
histograms: time to first token and per-token latency (seconds), and per engine round (one forward
pass over the running sequences) its time, its sequences and its tokens: how well requests batch.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
COUNT_BUCKETS = tuple(2.0 ** k for k in range(12))  # 1 ... 2048
#: name -> (kind, help) for counters, (kind, help, buckets, unit suffix) for histograms
_HELP = {
    "requests": ("counter", "HTTP requests answered, by endpoint and status"),
    "prompt_tokens": ("counter", "prompt tokens processed"),
    "prompt_tokens_cached": ("counter", "prompt tokens whose KV entries came from the prefix cache"),
    "generation_tokens": ("counter", "tokens generated"),
    "cancelled": ("counter", "generations stopped because the client went away"),
    "ttft": ("histogram", "time to first token in seconds", BUCKETS, "_seconds"),
    "token_latency": ("histogram", "time between consecutive generated tokens in seconds", BUCKETS, "_seconds"),
    "engine_round": ("histogram", "time of one engine round (a forward pass over the running sequences) in seconds",
                     ROUND_BUCKETS, "_seconds"),
    "engine_round_sequences": ("histogram", "sequences one engine round advanced (decoding steps and prompt chunks)",
                               COUNT_BUCKETS, ""),
    "engine_round_tokens": ("histogram", "tokens one engine round computed", COUNT_BUCKETS, ""),
}
PREFIX = "rbe_"
WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = collections.defaultdict(float)
        self._hist: dict[str, list] = {}
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        #: name -> function returning {labels tuple: value}, read at export time
        self.gauges: dict[str, tuple[str, Callable[[], dict[tuple, float]]]] = {}

    def add(self, name: str, value: float = 1, **labels) -> None:
        with self._lock:
            self._counters[name, tuple(sorted(labels.items()))] += value
            if name == "generation_tokens":
                now = time.monotonic()
                self._recent.append((now, int(value)))

    def count(self, name: str, **labels) -> None:
        self.add(name, 1, **labels)

    def observe(self, name: str, value: float) -> None:
        """One observation of the histogram ``name`` (seconds, or a count, as its help says)."""
        buckets = _HELP[name][2]
        with self._lock:
            counts, total = self._hist.setdefault(name, [[0] * (len(buckets) + 1), 0.0])
            counts[bisect.bisect_left(buckets, value)] += 1
            self._hist[name][1] = total + value

    def observe_round(self, seconds: float, sequences: int, tokens: int) -> None:
        """One engine round: its time, the sequences it advanced and the tokens it computed."""
        self.observe("engine_round", seconds)
        self.observe("engine_round_sequences", sequences)
        self.observe("engine_round_tokens", tokens)

    def tokens_per_second(self) -> float:
        with self._lock:
            now = time.monotonic()
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()
            return sum(n for _t, n in self._recent) / WINDOW_S

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            counters = dict(self._counters)
            hist = {k: (list(v[0]), v[1]) for k, v in self._hist.items()}
        for name, (kind, text, *histogram) in _HELP.items():
            full = PREFIX + name + ("_total" if kind == "counter" else histogram[1])
            lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
            if kind == "counter":
                rows = [(labels, v) for (n, labels), v in counters.items() if n == name] or [((), 0.0)]
                lines += [f"{full}{_labels(labels)} {_number(v)}" for labels, v in sorted(rows)]
            else:
                buckets = histogram[0]
                counts, total = hist.get(name, ([0] * (len(buckets) + 1), 0.0))
                running = 0
                for bound, c in zip((*buckets, float("inf")), counts, strict=True):
                    running += c
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f'{full}_bucket{{le="{le}"}} {running}')
                lines += [f"{full}_sum {_number(total)}", f"{full}_count {running}"]
        lines += [f"# HELP {PREFIX}tokens_per_second generated tokens per second over the last {WINDOW_S:g} s",
                  f"# TYPE {PREFIX}tokens_per_second gauge", f"{PREFIX}tokens_per_second {_number(self.tokens_per_second())}"]
        for name, (text, read) in self.gauges.items():
            lines += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} gauge"]
            lines += [f"{PREFIX}{name}{_labels(labels)} {_number(v)}" for labels, v in sorted(read().items())]
        return "\n".join(lines) + "\n"


def _number(v: float) -> str:
    """A sample value in full (``:g`` would print 1234567 as 1.23457e+06)."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                          for k, v in labels) + "}"
