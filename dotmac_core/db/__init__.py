"""Database side of dotmac_core: models, the engine, transactions, repositories."""
