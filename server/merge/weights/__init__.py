"""Pure tensor work of a merge, no engine and no HTTP: the base a delta is added to (``nf4``), PEFT
factors and the merge (``lora``), the merged checkpoint folder (``checkpoint``), served weight bytes
(``memory``), distribution distances (``fidelity``) and the fidelity report (``probe``)."""
