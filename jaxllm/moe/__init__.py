"""Conditional compute built on the MoE layers: Read-ME refactoring of dense models (`refactor`) and routing diagnostics
(`diagnostics`: OpenMoE's findings, inter-layer mutual information); their report over a run is `jaxllm.moe_report`."""
