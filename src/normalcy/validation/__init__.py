"""Data validation: Great Expectations suites built from the training data, and data cleaning."""
