"""Prometheus metrics (through prometheus-client), in a registry of the app's own.

What changes on its own (tasks by status, waiting clients, bytes of output, GitHub's and the
configuration repository's counts) is read when Prometheus scrapes; what happens once (a
task's end, an HTTP request) is counted when it happens. Labels are bounded: statuses,
apps and environments of the configuration repository, route templates, never raw paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pulsar_rest.tasks import Task, TaskStatus

# Deploys take seconds to an hour.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.durations = Histogram(
            "pulsar_rest_task_duration_seconds",
            "Time from a task's start to its end",
            ["app", "env"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.ended = Counter(
            "pulsar_rest_tasks_ended", "Tasks ended, by result", ["status"], registry=self.registry
        )
        self.requests = Counter(
            "pulsar_rest_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pulsar_rest_http_request_duration_seconds",
            "Time to answer (for a long-poll, its wait; for a stream, its life)",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "pulsar_rest_http_requests_in_progress",
            "Requests being answered, by route template: waiting long-polls and open streams",
            ["route"],
            registry=self.registry,
        )
        self._routes: dict[tuple[str, str], RouteMetrics] = {}

    def route(self, route: str, method: str) -> RouteMetrics:
        """The metrics of one route template and method: looked up once, not once a
        request (a label lookup costs microseconds, and a follower asks many times)."""
        found = self._routes.get((route, method))
        if found is None:
            found = self._routes[(route, method)] = RouteMetrics(self, route, method)
        return found

    def task_ended(self, task: Task) -> None:
        self.ended.labels(task.status.value).inc()
        if task.started_at is not None and task.finished_at is not None:
            seconds = (task.finished_at - task.started_at).total_seconds()
            self.durations.labels(task.app, task.env).observe(seconds)

    def watch(self, read: Callable[[], Live]) -> None:
        """Read the live values from `read()` at each scrape."""
        self.registry.register(_LiveCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RouteMetrics:
    """The labelled metrics of one route template and method."""

    def __init__(self, metrics: Metrics, route: str, method: str) -> None:
        self.in_progress = metrics.in_progress.labels(route)
        self.latency = metrics.latency.labels(route, method)
        self._requests = metrics.requests
        self._route, self._method = route, method
        self._answered: dict[int, Counter] = {}

    def answered(self, status: int, seconds: float) -> None:
        counter = self._answered.get(status)
        if counter is None:
            counter = self._answered[status] = self._requests.labels(self._route, self._method, str(status))
        counter.inc()
        self.latency.observe(seconds)


class Live:
    """The values read at a scrape."""

    def __init__(
        self,
        tasks: dict[str, int],
        started: int,
        output_bytes: int,
        waiters: int,
        github: tuple[int, int] | None,
        fetches: tuple[int, int] | None,
    ) -> None:
        self.tasks = tasks
        self.started = started
        self.output_bytes = output_bytes
        self.waiters = waiters
        self.github = github  # (calls, failures); None when GitHub is not asked
        self.fetches = fetches  # (fetches, failures); None without a git repository


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], Live]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        live = self._read()
        tasks = GaugeMetricFamily("pulsar_rest_tasks", "Tasks in the history, by status", labels=["status"])
        for status in TaskStatus:
            tasks.add_metric([status.value], live.tasks.get(status.value, 0))
        yield tasks
        yield CounterMetricFamily(
            "pulsar_rest_tasks_started", "Tasks whose process started", value=live.started
        )
        yield CounterMetricFamily(
            "pulsar_rest_output_bytes", "Bytes of task output taken in", value=live.output_bytes
        )
        yield GaugeMetricFamily(
            "pulsar_rest_long_poll_waiters", "Long-polls and streams waiting for news", value=live.waiters
        )
        if live.github is not None:
            yield CounterMetricFamily(
                "pulsar_rest_github_requests", "Requests to GitHub", value=live.github[0]
            )
            yield CounterMetricFamily(
                "pulsar_rest_github_failures",
                "Requests to GitHub that failed (down, slow, 5xx, rate limit)",
                value=live.github[1],
            )
        if live.fetches is not None:
            yield CounterMetricFamily(
                "pulsar_rest_config_fetches", "Fetches of the configuration repository", value=live.fetches[0]
            )
            yield CounterMetricFamily(
                "pulsar_rest_config_fetch_failures",
                "Fetches of the configuration repository that failed",
                value=live.fetches[1],
            )
