"""A FastAPI service over two tenant tables: projects and their tasks."""
