"""lorafleet's ground floor: the configs every room shares, and the one way to read and write files.

- `job`, `data`, `fleet`, `tasks`, `compose`: pure pydantic models. No torch, no transformers, no
  file reads, at import or in validators (checks that need the disk live in `trainer.checks`).
- `yamlfile`: the one YAML reader (YAML 1.2, duplicate keys refused, line numbers kept).
- `loading`: files -> validated configs, each problem located at its file and line.
- `problems`: `Problem` and `ConfigError`, what every command prints for bad input.
- `atomic`: the one atomic writer of files and directories (fsynced, mode 0644/0755, strict JSON).
- `outputs`: where a command may write without destroying a user's files.
- `jobdir`: a job's output directory and its file names.

Nothing here imports another lorafleet room (docs/architecture.md states the rule; a test enforces it).
"""
