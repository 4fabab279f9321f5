"""`helm-run --runner-class-name flexgen_helm.helm.runner.FlexGenRunner`: stock HELM, except that
each run's requests for flexgen deployments go to the engine all at once instead of one by one."""
from __future__ import annotations

import os
from dataclasses import replace

from helm.benchmark.adaptation.request_state import RequestState
from helm.benchmark.adaptation.scenario_state import ScenarioState
from helm.benchmark.executor import ExecutionSpec, Executor, ExecutorError
from helm.benchmark.metrics.metric_service import MetricService
from helm.benchmark.runner import Runner
from helm.benchmark.window_services.tokenizer_service import TokenizerService
from helm.common.hierarchical_logger import hlog, hwarn
from helm.common.local_context import LocalContext
from helm.common.request import GeneratedOutput, RequestResult

from ..engine.config import ConfigError
from .client import FlexGenClient
from .timing import TIMING_LOG, TimingObserver


def flexgen_client(context: object, deployment: str) -> FlexGenClient | None:
    """The client HELM would use for `deployment`, when it is ours (local contexts only)."""
    if not isinstance(context, LocalContext):
        return None
    client = context.client._get_client(deployment)  # the one private call: AutoClient has no public getter
    return client if isinstance(client, FlexGenClient) else None


def settle(state: RequestState, result: RequestResult) -> RequestState:
    """HELM's own rule (Executor.process): non-fatal errors become an empty completion."""
    if not result.success:
        if result.error_flags and not result.error_flags.is_fatal:
            hwarn(f"Non-fatal error treated as empty completion: {result.error}")
            result.completions = [GeneratedOutput(text="", logprob=0, tokens=[])]
        else:
            raise ExecutorError(f"{result.error} Request: {state.request}")
    return replace(state, result=result)


class FlexGenExecutor(Executor):
    timing_log: str | None = None  # set by FlexGenRunner: the suite's timing log
    run_name: str = ""

    def execute(self, scenario_state: ScenarioState) -> ScenarioState:
        if self.execution_spec.dry_run:
            return scenario_state
        states = list(scenario_state.request_states)
        by_deployment: dict[str, list[int]] = {}
        for i, s in enumerate(states):
            by_deployment.setdefault(s.request.model_deployment, []).append(i)
        for deployment, idx in by_deployment.items():
            client = flexgen_client(self.context, deployment)
            if client is None:  # not ours: HELM's thread pool, one request at a time
                done = super().execute(replace(scenario_state, request_states=[states[i] for i in idx]))
                for i, s in zip(idx, done.request_states):
                    states[i] = s
                continue
            hlog(f"flexgen: {len(idx)} requests for {deployment} in one batch call")
            suite = os.path.basename(os.path.dirname(self.timing_log)) if self.timing_log else ""
            obs = TimingObserver(self.timing_log, suite, states[idx[0]].request.model, deployment,
                                 [self.run_name] * len(idx), progress=True)
            try:
                results = client.make_batch_request([states[i].request for i in idx], observer=obs)
            except ConfigError as e:
                raise ExecutorError(f"flexgen engine for {deployment}: {e}") from e
            finally:
                obs.close()
            for i, r in zip(idx, results):
                states[i] = settle(states[i], r)
        return replace(scenario_state, request_states=states)


class FlexGenRunner(Runner):
    def __init__(self, execution_spec: ExecutionSpec, *args, **kwargs):
        super().__init__(execution_spec, *args, **kwargs)
        self.executor = FlexGenExecutor(execution_spec)
        self.executor.timing_log = os.path.join(self.runs_path, TIMING_LOG)
        self._services()

    def _services(self) -> None:
        # HELM's services must talk to the replaced executor's context (its cache, its clients)
        self.tokenizer_service = TokenizerService(self.executor.context)
        self.metric_service = MetricService(self.executor.context)

    def run_one(self, run_spec) -> None:
        self.executor.run_name = run_spec.name
        super().run_one(run_spec)
