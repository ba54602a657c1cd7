"""Files in the layouts of published weight datasets, read and written:

- `nws`: the published NWS layout (per-net directories, index CSVs), read with every check an
  importer owes its users;
- `small_cnn_zoo`: the Small CNN Zoo layout, for nets of one architecture;
- `importer`, `exporter`: the engines of `import_nws` and `export_nws` (published nets as MLflow
  net runs, and back).
"""
