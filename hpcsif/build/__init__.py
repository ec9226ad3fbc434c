"""Definition-file builds: :mod:`hpcsif.build.deffile` parses, :mod:`hpcsif.build.builder` builds."""
