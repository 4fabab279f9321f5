"""Imported by HELM through the `helm` entry point (`helm-run`, `helm-summarize`): registers the
run specs this project adds. Keep it light: HELM imports every entry point at start-up."""
from __future__ import annotations

from helm.benchmark.adaptation.common_adapter_specs import get_summarization_adapter_spec
from helm.benchmark.metrics.common_metric_specs import get_basic_metric_specs
from helm.benchmark.run_spec import RunSpec, run_spec_function
from helm.benchmark.scenarios.scenario import ScenarioSpec


@run_spec_function("summarization_xsum_sampled_rouge")
def get_xsum_sampled_rouge_spec(temperature: float = 0.3) -> RunSpec:
    """HELM's `summarization_xsum_sampled` (same data, prompt, 64 tokens, temperature, "###" stop),
    scored with ROUGE-1/2/L only: the stock summarization metric needs crfm-helm[summarization],
    which cannot be installed next to torch 2 and downloads models at run time."""
    scenario_spec = ScenarioSpec(
        class_name="helm.benchmark.scenarios.summarization_scenario.SummarizationScenario",
        args={"dataset_name": "xsum-sampled", "sampling_min_length": 50, "sampling_max_length": 150,
              "doc_max_length": 512})
    adapter_spec = get_summarization_adapter_spec(num_sents=1, max_tokens=64, temperature=temperature)
    return RunSpec(
        name=f"summarization_xsum_sampled_rouge:temperature={temperature}",
        scenario_spec=scenario_spec,
        adapter_spec=adapter_spec,
        metric_specs=get_basic_metric_specs(["rouge_1", "rouge_2", "rouge_l"]),
        groups=["summarization_xsum"],  # the classic schema's XSUM group (main metric ROUGE-2)
    )
