"""Online DPO's pieces and what compares generations: the sampler seam and its Hugging Face `generate`
implementation (`sampling.py`), a colocated vLLM engine as the second (`vllm_sampler.py`), judges that score
completions, read from a `reward_model` string (`judges.py`), ordering each prompt's two judged samples into
a pair (`pairing.py`), the objective/* metrics of the samples (`metrics.py`), and policy-vs-reference
generation metrics with a win rate, shared by validation and evaluate.py (`comparison.py`).

Imports: foundation, config, data, models, dpo
"""
