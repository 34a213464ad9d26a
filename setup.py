"Installs `llmops_tpl` from nbdev's `settings.ini`: one source for name, version and dependencies."
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

def reqs(key): return cfg.get(key, '').split()

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'],
    author=cfg['author'], author_email=cfg['author_email'], license=cfg['license'], url=cfg['git_url'],
    keywords=cfg['keywords'].split(), classifiers=['Programming Language :: Python :: 3'],
    project_urls={'Source': cfg['git_url']},
    packages=setuptools.find_packages(include=[cfg['lib_path'], cfg['lib_path'] + '.*']),
    include_package_data=True, python_requires='>=' + cfg['min_python'],
    install_requires=reqs('requirements'),
    extras_require={'dev': reqs('dev_requirements')},
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
                  'mlflow.app': ['llmops-tpl=llmops_tpl.gateway:server_app']},  # `mlflow server --app-name llmops-tpl`: the gateway with rate limits
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
    zip_safe=False)
