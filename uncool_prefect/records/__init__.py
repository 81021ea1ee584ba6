"""Run records and what reads them: lineage, experiments, checkout, the reproduction audit."""
