"""Conditional compute built on the MoE layers: Read-ME refactoring of dense models (`refactor`), routing diagnostics
(`diagnostics`: OpenMoE's findings, inter-layer mutual information) and their report over a run (`report`)."""
