"""Examples run by ``shardflow train examples/NAME.toml`` from the repository root; a package, so that an
``examples`` package installed elsewhere cannot stand in for this folder."""
