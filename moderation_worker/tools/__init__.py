"""Tools around the product: the demo, benchmarks, the quality report, plots, baselines, data
loading and a deterministic stand-in model. They use the runtime, the model and the edges;
nothing imports them but the CLI and the tests."""
