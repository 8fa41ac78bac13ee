"""Jobs: workflows that compose the libraries and own run directories (search, validate, export, report, the main job,
training), and the run configuration and run reader they share. Above the libraries and the deployment layer; below
the face (CLI, API). See ARCHITECTURE.md."""
