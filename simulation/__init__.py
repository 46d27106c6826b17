"""`fedlink simulate`: a federation of virtual clients in one program (docs/simulation.md)."""
