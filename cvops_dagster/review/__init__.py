"""Review (next: the review issue): the FiftyOne dataset over production batches, Brain runs,
saved views, and reading reviewers' labels back as feedback for the next dataset version."""
