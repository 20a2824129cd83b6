"""The four DealStream services and the `dealstream` command."""
