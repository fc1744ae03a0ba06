"""mixdit.pipelines."""
