"""Glue for distillation frameworks. Each submodule imports its framework and is imported on its own
(`import dctkd_ext` never imports them): `dctkd_ext.integrations.torchdistill`."""
