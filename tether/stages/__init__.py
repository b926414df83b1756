"""Training stages: each one explicit loop, read top to bottom."""
