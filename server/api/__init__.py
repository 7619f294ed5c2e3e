"""The HTTP layer: thin routes over `server.state.ServerState` (one module per route group under `routes/`)."""
