"""The lab beside the product: simulated studies, local test peers and the demo. The node's
runtime never imports it (an import-linter contract); the CLI does, lazily."""
