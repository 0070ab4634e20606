"""Block reconstruction, method-agnostic: the unit type and its losses (`unit`), the capture of a
unit's inputs and targets into a cache (`cache`), one training step replayed from CUDA graphs
(`step`) and the engine that trains units in order (`engine`). The model's forward is injected by
the caller (`ReconstructionSettings.forward`, the model adapter's `forward`), and so are the units
(the adapter's `reconstruction_units`; SAM-1's are in `ptqbench/models/sam1/units.py`)."""
