"""Core algorithms of reidal: vectors and labels in, pairs and labels out. No gRPC here."""
