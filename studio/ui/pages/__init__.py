"""The five steps of the window: Model, Dataset, Settings, Train, Try & Export."""
