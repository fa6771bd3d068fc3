"""gRPC servicers of reidal: thin layers that validate, call the core, persist, answer."""
